"""Lab: instability (paper Sec. 4.1-4.2, Fig. 4). Raising the lr (or the batch) makes ViT training
unstable; the instability shows first as spikes of the first layer's gradient norm, a few iterations
before the loss and accuracy dip, and a frozen random patch projection removes the spikes.

    python labs/instability.py            # a few minutes on 2 CPU cores (<= 15)
    python labs/instability.py --smoke    # seconds
"""
import _lab

RUNS = {'lr 2e-3, learned projection (demo)': [],
        'lr 2e-2, learned projection': ['--lr', '2e-2'],
        'lr 2e-2, frozen random projection': ['--lr', '2e-2', '--stop-grad-conv1']}

if __name__ == '__main__':
    _lab.main('instability', RUNS, __doc__,
              title='Instability: lr 10x, learned vs frozen random patch projection (demo ViT)',
              finding=('large lr and batch make ViT-B training unstable (batch 1k / 2k: 71.5 / '
                       '72.6, 4k: dips and lower accuracy); first-layer gradient spikes precede '
                       'the dips (Fig. 4); a frozen random patch projection removes them and '
                       'raises accuracy (SimCLR +0.8, BYOL +1.3).'))

"""Lab: the momentum encoder (paper Sec. 6, ViT-B, 300 epochs): m = 0.99 76.5, 0.9 75.6,
0.999 75.0, and m = 0 (the keys come from the query encoder's current weights, no gradient) 74.3.
The demo uses m = 0.9: a few hundred steps are too few for m = 0.99's slow keys.

    python labs/momentum.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/momentum.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/momentum.py --smoke      # seconds
"""
import _lab

RUNS = {'m 0.9 (demo)': [], 'm 0.99 (paper)': ['--moco-m', '0.99'],
        'm 0 (no momentum)': ['--moco-m', '0']}
# The paper's gap to m = 0.9, in points of ImageNet linear accuracy: 76.5 - 75.6, 74.3 - 75.6.
PAPER = {'m 0.99 (paper)': 0.9, 'm 0 (no momentum)': -1.3}
TITLE = 'Momentum m of the key encoder: 0.9 (demo), 0.99, 0 (demo ViT)'
FINDING = 'ViT-B, 300 epochs, linear probing: m 0.99 76.5, 0.9 75.6, 0.999 75.0, 0 74.3.'

if __name__ == '__main__':
    _lab.main('momentum')

"""Lab: MoCo v3 vs SimCLR vs BYOL on the same ViT and heads (paper Sec. 6, Table 4):
ViT-B, 300 epochs, linear probing: MoCo v3 76.5, SimCLR 73.9, BYOL 73.9; ViT-S: 72.5 / 69.0 / 71.0.

    python labs/frameworks.py            # a few minutes on 2 CPU cores (<= 15)
    python labs/frameworks.py --smoke    # seconds
"""
import _lab

RUNS = {'MoCo v3 (default)': [], 'SimCLR': ['--framework', 'simclr'],
        'BYOL': ['--framework', 'byol']}

if __name__ == '__main__':
    _lab.main('frameworks', RUNS, __doc__,
              title='MoCo v3 vs SimCLR vs BYOL (demo ViT)',
              finding=('ViT-B, 300 epochs, linear probing: MoCo v3 76.5, SimCLR 73.9, BYOL 73.9 '
                       '(ViT-S: 72.5 / 69.0 / 71.0).'))

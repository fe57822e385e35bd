"""Lab: MoCo v3 vs SimCLR vs BYOL on the same ViT and heads (paper Sec. 6, Table 4):
ViT-B, 300 epochs, linear probing: MoCo v3 76.5, SimCLR 73.9, BYOL 73.9; ViT-S: 72.5 / 69.0 / 71.0.

    python labs/frameworks.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/frameworks.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/frameworks.py --smoke      # seconds
"""
import _lab

RUNS = {'MoCo v3 (default)': [], 'SimCLR': ['--framework', 'simclr'],
        'BYOL': ['--framework', 'byol']}
# The paper's gap to MoCo v3 (ViT-B), in points of ImageNet linear accuracy: 73.9 - 76.5, twice.
PAPER = {'SimCLR': -2.6, 'BYOL': -2.6}
TITLE = 'MoCo v3 vs SimCLR vs BYOL (demo ViT)'
FINDING = ('ViT-B, 300 epochs, linear probing: MoCo v3 76.5, SimCLR 73.9, BYOL 73.9 (ViT-S: '
           '72.5 / 69.0 / 71.0).')

if __name__ == '__main__':
    _lab.main('frameworks')

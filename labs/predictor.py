"""Lab: the prediction head (paper Sec. 6, ViT-B, 300 epochs). MoCo v3 borrows BYOL's predictor
(an MLP on the query side only): it helps, but is not essential, unlike in BYOL, which collapses
without one: 76.5 with it, 75.5 without.

    python labs/predictor.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/predictor.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/predictor.py --smoke      # seconds
"""
import _lab

RUNS = {'with predictor (default)': [], 'no predictor': ['--no-predictor']}
# The paper's gap, in points of ImageNet linear accuracy: 75.5 - 76.5.
PAPER = {'no predictor': -1.0}
TITLE = 'MoCo v3 with and without the prediction head (demo ViT)'
FINDING = 'ViT-B, 300 epochs, linear probing: 76.5 with the predictor, 75.5 without.'

if __name__ == '__main__':
    _lab.main('predictor')

"""Lab: the prediction head (paper Sec. 6, ViT-B, 300 epochs). MoCo v3 borrows BYOL's predictor
(an MLP on the query side only): it helps, but is not essential, unlike in BYOL, which collapses
without one: 76.5 with it, 75.5 without.

    python labs/predictor.py            # a few minutes on 2 CPU cores (<= 15)
    python labs/predictor.py --smoke    # seconds
"""
import _lab

# The second seed of the default run measures the noise: a gap between two settings smaller than
# the gap between two seeds of the same setting says nothing.
RUNS = {'with predictor (default)': [], 'no predictor': ['--no-predictor'],
        'with predictor, seed 1': ['--seed', '1']}

if __name__ == '__main__':
    _lab.main('predictor', RUNS, __doc__,
              title='MoCo v3 with and without the prediction head (demo ViT)',
              finding=('ViT-B, 300 epochs, linear probing: 76.5 with the predictor, 75.5 '
                       'without.'))

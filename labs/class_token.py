"""Lab: class token vs global average pooling (paper Sec. 6, ViT-B, 300 epochs): the class token
76.5; no class token, the patch tokens average-pooled, without the final LayerNorm 76.3; the same
with the final LayerNorm 69.7.

    python labs/class_token.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/class_token.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/class_token.py --smoke      # seconds
"""
import _lab

RUNS = {'class token (default)': [], 'avg pool, no final LN': ['--pool', 'avg', '--no-final-norm'],
        'avg pool, final LN': ['--pool', 'avg']}
# The paper's gap to the class token, in points of ImageNet linear accuracy: 76.3 - 76.5,
# 69.7 - 76.5.
PAPER = {'avg pool, no final LN': -0.2, 'avg pool, final LN': -6.8}
TITLE = 'Class token vs average pooling, with and without the final LayerNorm (demo ViT)'
FINDING = ('ViT-B, 300 epochs, linear probing: class token 76.5; average pooling without the '
           'final LayerNorm 76.3, with it 69.7.')

if __name__ == '__main__':
    _lab.main('class_token')

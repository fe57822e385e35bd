"""Lab: position embedding (paper Sec. 6, ViT-B, 300 epochs): fixed 2-D sin-cos 76.5, learned
76.1, none 74.9. Without any position embedding the model loses only 1.6 points: it relies on
positions less than one would think.

    python labs/position_embedding.py            # a few minutes on 2 CPU cores (<= 15)
    python labs/position_embedding.py --smoke    # seconds
"""
import _lab

RUNS = {'sin-cos (default)': [], 'learned': ['--pos-embed', 'learned'],
        'none': ['--pos-embed', 'none']}

if __name__ == '__main__':
    _lab.main('position_embedding', RUNS, __doc__,
              title='Position embedding: sin-cos vs learned vs none (demo ViT)',
              finding=('ViT-B, 300 epochs, linear probing: sin-cos 76.5, learned 76.1, none '
                       '74.9.'))

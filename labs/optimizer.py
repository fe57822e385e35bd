"""Lab: AdamW vs LAMB (paper Sec. 4.1, Fig. 3). LAMB can match AdamW at a well-chosen lr, but is
more sensitive to it; the paper keeps AdamW. Here LAMB runs at AdamW's lr and at 5x that.

    python labs/optimizer.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/optimizer.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/optimizer.py --smoke      # seconds
"""
import _lab

RUNS = {'AdamW (default)': [], 'LAMB, same lr': ['--optimizer', 'lamb'],
        'LAMB, lr 5x': ['--optimizer', 'lamb', '--lr', '1e-2']}
# The paper gives no gap at these lrs: LAMB is as good only at its own, tuned lr (Fig. 3).
PAPER = {}
TITLE = "AdamW vs LAMB at AdamW's lr and at 5x (demo ViT)"
FINDING = ('ViT-B: AdamW is kept; LAMB reaches a similar accuracy only at its own, tuned lr, and '
           'is less robust to the lr (Fig. 3).')

if __name__ == '__main__':
    _lab.main('optimizer')

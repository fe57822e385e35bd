"""Lab: training length (paper Table 1 / Sec. 5): longer pretraining gives better features, with
diminishing returns. Three runs of 1, 2 and 3 epochs, each with its full schedule (its warm-up a
quarter of the run, then a half-cosine to ~0).

    python labs/training_length.py              # one seed: a few minutes on 2 CPU cores (<= 15)
    python labs/training_length.py --seeds 5    # the reference, paired seeds (labs/results)
    python labs/training_length.py --smoke      # seconds
"""
import _lab

RUNS = {'1 epoch': ['--epochs', '1'], '2 epochs': ['--epochs', '2'],
        '3 epochs': ['--epochs', '3']}
# The paper: longer is better (a direction; its lengths are hundreds of epochs).
PAPER = {'2 epochs': '+', '3 epochs': '+'}
TITLE = 'Training length: 1, 2 and 3 epochs, each with its own schedule (demo ViT)'
FINDING = ('longer pretraining gives higher linear accuracy, with diminishing returns (e.g. ViT-B '
           '300 vs 600 epochs).')

if __name__ == '__main__':
    _lab.main('training_length')

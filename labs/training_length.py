"""Lab: training length (paper Table 1 / Sec. 5): longer pretraining gives better features, with
diminishing returns. Three runs of 1, 2 and 3 epochs, each with its full schedule.

    python labs/training_length.py            # a few minutes on 2 CPU cores (<= 15)
    python labs/training_length.py --smoke    # seconds
"""
import _lab

RUNS = {'1 epoch': ['--epochs', '1'], '2 epochs': ['--epochs', '2'],
        '3 epochs': ['--epochs', '3']}

if __name__ == '__main__':
    _lab.main('training_length', RUNS, __doc__,
              title='Training length: 1, 2 and 3 epochs, each with its own schedule (demo ViT)',
              finding=('longer pretraining gives higher linear accuracy, with diminishing '
                       'returns (e.g. ViT-B 300 vs 600 epochs).'))

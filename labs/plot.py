"""The course labs' plots: pretraining runs side by side, in the figures of the paper (Chen, Xie,
He, ICCV 2021): training loss, kNN accuracy, the lr and momentum schedules, and the gradient
norms of the first layer and the last block, whose spikes signal instability (Sec. 4.1, Fig. 4).

    python labs/plot.py output/pretrain                          # -> output/pretrain/plot.png
    python labs/plot.py runs/frozen runs/trained --labels frozen trained -o cmp.png
    python labs/plot.py runs/a runs/b --title "ViT-S, 100 epochs" --table   # + a markdown table

Each RUN_DIR is a train_pretrain.py --output-dir: its log.jsonl holds step rows (they have a 'step')
and epoch rows (epoch 0 = the random init). matplotlib only, no torch.
"""
import argparse
import json
import os
import statistics
import sys

import matplotlib
matplotlib.use('Agg')                         # files only: works without a screen
import matplotlib.pyplot as plt               # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D           # noqa: E402
from matplotlib.ticker import MaxNLocator     # noqa: E402

MISSING = '—'


def read_log(run_dir):
    """run_dir/log.jsonl -> (step rows, epoch rows), each a list of dicts in file order."""
    path = os.path.join(run_dir, 'log.jsonl')
    if not os.path.isdir(run_dir):
        raise ValueError(f'{run_dir}: no such run directory')
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file (is {run_dir} a train_pretrain.py --output-dir?)')
    steps, epochs = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                raise ValueError(f'{path}, line {n}: not a JSON object')
            (steps if 'step' in row else epochs).append(row)
    if not steps and not epochs:
        raise ValueError(f'{path} is empty')
    return steps, epochs


def run_labels(run_dirs, labels):
    """The legend's names: one per run, the run dir's basename by default."""
    if labels is None:
        return [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'{len(labels)} labels for {len(run_dirs)} run directories')
    return list(labels)


def curve(ax, rows, x, y, *style, **kw):
    """Plots y against x over the rows whose y is not None (a frozen layer has no gradient) ->
    whether it did: no empty line is drawn, so `ax.lines` tells whether a panel has data."""
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None]
    if pts:
        ax.plot(*zip(*pts), *style, **kw)
    return bool(pts)


def plot_runs(run_dirs, labels=None, out=None, title=None):
    """The runs overlaid, one colour each, in four panels -> the Figure (also a PNG at out)."""
    labels = run_labels(run_dirs, labels)
    runs = [read_log(d) for d in run_dirs]
    fig, ((ax_loss, ax_knn), (ax_lr, ax_grad)) = plt.subplots(2, 2, figsize=(11, 8))
    ax_m = ax_lr.twinx()                      # m ~ 0.99..1 and lr ~ 1e-4: one axis each
    frozen = []                               # (d)'s legend entries of the runs without grad_first
    for i, ((steps, epochs), label) in enumerate(zip(runs, labels)):
        c = f'C{i % 10}'
        curve(ax_loss, steps, 'step', 'loss', color=c, label=label)
        curve(ax_knn, epochs, 'epoch', 'knn_top1', 'o-', color=c, label=label)
        curve(ax_lr, steps, 'step', 'lr', color=c)
        curve(ax_m, steps, 'step', 'm', '--', color=c)
        first = curve(ax_grad, steps, 'step', 'grad_first', color=c)
        last = curve(ax_grad, steps, 'step', 'grad_last', '--', color=c)
        if last and not first:                # a frozen patch projection has no gradient
            frozen.append(Line2D([], [], color=c, ls='--', label=f'{label}: first layer (frozen)'))
        spikes = [(r['step'], r[r['spike']]) for r in steps if 'spike' in r]
        if spikes:                            # scatter, not plot: ax_grad.lines stay the curves
            ax_grad.scatter(*zip(*spikes), marker='x', s=60, color=c, zorder=3)

    ax_loss.set(title='(a) training loss', xlabel='iteration', ylabel='loss')
    ax_knn.set(title='(b) kNN top-1 accuracy', xlabel='epoch (0 = random init)',
               ylabel='kNN top-1 (%)')
    ax_knn.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set(title='(c) schedules: lr (solid), momentum m (dashed)', xlabel='iteration',
              ylabel='learning rate (solid)')
    ax_m.set_ylabel('momentum m (dashed)')
    ax_grad.set(title='(d) gradient norm (Fig. 4)', xlabel='iteration', ylabel='gradient norm')
    for ax in (ax_loss, ax_knn):
        if ax.lines:
            ax.legend(fontsize='small')
    if ax_grad.lines:
        ax_grad.set_yscale('log')             # a spike is 10x the median: log shows it and the rest
        # colour = run, as in (a); the line style says which layer: a legend that stays short
        key = [Line2D([], [], color='k', label='first layer'),
               Line2D([], [], color='k', ls='--', label='last block')]
        if ax_grad.collections:
            key.append(Line2D([], [], color='k', ls='', marker='x', label='spike (10x median)'))
        lo, hi = ax_grad.get_ylim()           # headroom (a third, in decades) for the key
        ax_grad.set_ylim(lo, hi * (hi / lo) ** 0.5)
        ax_grad.legend(handles=key + frozen, fontsize='small', ncol=2, loc='upper right')
    for ax in (ax_loss, ax_knn, ax_lr, ax_grad):
        if not ax.lines:
            ax.text(0.5, 0.5, 'no data', transform=ax.transAxes, ha='center', va='center',
                    color='gray', fontsize='large')
    if not ax_m.lines:
        ax_m.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=110)
    return fig


def fmt(v, digits):
    return MISSING if v is None else f'{v:.{digits}f}'


def summary_table(run_dirs, labels=None):
    """One markdown row per run: final, best and initial kNN top-1, the final mean loss, the spike
    ratio max / median of the first layer's gradient norm over the logged steps, and the steps
    trained (last step index + 1)."""
    labels = run_labels(run_dirs, labels)
    lines = ['| run | final kNN top-1 (%) | best kNN top-1 (%) | kNN at init (%) | final loss_avg '
             '| grad_first max / median | steps |',
             '|---|---|---|---|---|---|---|']
    for d, label in zip(run_dirs, labels):
        steps, epochs = read_log(d)
        knn = [r['knn_top1'] for r in epochs if r.get('knn_top1') is not None]
        init = [r['knn_top1'] for r in epochs if r['epoch'] == 0]
        losses = [r['loss_avg'] for r in epochs if r.get('loss_avg') is not None]
        grads = [r['grad_first'] for r in steps if r.get('grad_first') is not None]
        cells = [label,
                 fmt(knn[-1] if knn else None, 1),
                 fmt(max(knn) if knn else None, 1),
                 fmt(init[-1] if init else None, 1),
                 fmt(losses[-1] if losses else None, 4),
                 fmt(max(grads) / statistics.median(grads) if grads else None, 1),
                 str(steps[-1]['step'] + 1) if steps else MISSING]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Plot train_pretrain.py runs (log.jsonl).')
    parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                        help='a train_pretrain.py --output-dir, holding log.jsonl')
    parser.add_argument('--labels', nargs='+',
                        help='legend names, one per run (default: the dir names)')
    parser.add_argument('-o', '--out', help='the PNG to write (default: FIRST_RUN_DIR/plot.png)')
    parser.add_argument('--title', help='a title above the four panels')
    parser.add_argument('--table', action='store_true', help='also print a markdown summary table')
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], 'plot.png')
    plot_runs(args.run_dirs, args.labels, out, args.title)
    print(out)
    if args.table:
        print(summary_table(args.run_dirs, args.labels))


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:        # a user error: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)

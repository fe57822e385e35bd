"""The course labs' plots: pretraining runs side by side, in the figures of the paper (Chen, Xie,
He, ICCV 2021): training loss, kNN accuracy, the lr and momentum schedules, and the gradient
norms of the first layer and the last block, whose spikes signal instability (Sec. 4.1, Fig. 4).

    python labs/plot.py output/pretrain                          # -> output/pretrain/plot.png
    python labs/plot.py labs/results/predictor/* -o p.png --table   # each setting: mean and band
    python labs/plot.py labs/results/predictor/* -o p.png --against output/labs/runs/mine_e2_s0
    python labs/plot.py runs/a runs/b --labels frozen trained -o cmp.png --title "ViT-S"

Each RUN_DIR is a train_pretrain.py --output-dir: its log.jsonl holds step rows (they have a 'step')
and epoch rows (epoch 0 = the random init); a run still training is read up to its last full line.
Runs that share a label are the seeds of one setting: drawn as their mean with a 95% band (and
thin lines per seed in the kNN panel). Without --labels a run's label is its folder's name less
a seed suffix `_s<seed>`, as the labs name their runs: labs/results/<study>/* groups itself.
--against draws runs (a student's own, live or finished) in black over the others' bands.
matplotlib and numpy, no torch.
"""
import argparse
import json
import os
import re
import statistics
import sys

import numpy as np
import matplotlib
matplotlib.use('Agg')                         # files only: works without a screen
import matplotlib.pyplot as plt               # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D           # noqa: E402
from matplotlib.patches import Patch          # noqa: E402
from matplotlib.ticker import MaxNLocator     # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats                                  # noqa: E402  (the labs' interval rule)

MISSING = '—'
LAYERS = ('grad_first', 'grad_last')
SEED_SUFFIX = re.compile(r'_s(\d+)$')


# ----------------------------------------------------------------------------- reading runs
def read_log(run_dir):
    """run_dir/log.jsonl -> (step rows, epoch rows), each a list of dicts in file order. A last
    line without its newline is a row still being written by a live run: left out."""
    path = os.path.join(run_dir, 'log.jsonl')
    if not os.path.isdir(run_dir):
        raise ValueError(f'{run_dir}: no such run directory')
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file (is {run_dir} a train_pretrain.py --output-dir?)')
    lines = open(path).read().split('\n')     # the last: '' after a newline, or unfinished
    steps, epochs = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if row is None and n == len(lines):   # a live run's row, half written: not yet a row
            continue
        if not isinstance(row, dict):
            raise ValueError(f'{path}, line {n}: not a JSON object')
        (steps if 'step' in row else epochs).append(row)
    if not steps and not epochs:
        raise ValueError(f'{path} is empty')
    return steps, epochs


def read_json(path):
    return json.load(open(path)) if os.path.isfile(path) else None


def setting_name(run_dir):
    """A run folder's name less its seed suffix: default_e2_s3 -> default_e2."""
    return SEED_SUFFIX.sub('', os.path.basename(os.path.normpath(run_dir)))


def run_numbers(run_dir):
    """What a lab's table says of one run: the kNN top-1 (%) after the last epoch ('final'), at
    the random init ('init', epoch 0) and its best; the last epoch's mean loss; the seed (its
    config.json's, else the folder's suffix, else 0); the steps trained; per layer the number of
    logged spikes (train_pretrain.py flags a step whose norm is 10x the running median, after the
    first steps) and the largest spike's ratio; whether the first layer had no gradient at all
    (a frozen patch projection)."""
    steps, epochs = read_log(run_dir)
    config = read_json(os.path.join(run_dir, 'config.json')) or {}
    knn = [r for r in epochs if r.get('knn_top1') is not None]
    losses = [r['loss_avg'] for r in epochs if r.get('loss_avg') is not None]
    suffix = SEED_SUFFIX.search(os.path.basename(os.path.normpath(run_dir)))
    spikes = [r for r in steps if r.get('spike')]
    return dict(
        final=knn[-1]['knn_top1'] if knn and knn[-1]['epoch'] > 0 else None,
        init=next((r['knn_top1'] for r in knn if r['epoch'] == 0), None),
        best=max((r['knn_top1'] for r in knn), default=None),
        loss=losses[-1] if losses else None,
        epochs=max((r['epoch'] for r in epochs), default=0),
        seed=config.get('seed', int(suffix.group(1)) if suffix else 0),
        steps=steps[-1]['step'] + 1 if steps else 0,
        spikes={k: sum(r['spike'] == k for r in spikes) for k in LAYERS},
        spike_ratio=max((r['spike_ratio'] for r in spikes if 'spike_ratio' in r), default=None),
        frozen=bool(steps) and all(r.get('grad_first') is None for r in steps))


def run_labels(run_dirs, labels):
    """The legend's names, one per run: runs with the same name are seeds of one setting."""
    if labels is None:
        return [setting_name(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f'{len(labels)} labels for {len(run_dirs)} run directories')
    return list(labels)


def by_setting(items, labels):
    """items and their labels -> {label: [items]}, in the order the labels first appear."""
    groups = {}
    for item, label in zip(items, labels):
        groups.setdefault(label, []).append(item)
    return groups


# ----------------------------------------------------------------------------- drawing
def series(rows, x, y):
    """{x: y} over the rows whose y is not None (a frozen layer has no gradient)."""
    return {r[x]: r[y] for r in rows if r.get(y) is not None}


def across(runs_series):
    """[{x: y}] of several seeds (at least one) -> (xs, (seeds, len(xs)) array) at the x every
    seed logged."""
    xs = sorted(set.intersection(*(set(s) for s in runs_series)))
    return np.array(xs), np.array([[s[x] for x in xs] for s in runs_series])


def band(ax, runs_series, color, label=None, style='-', thin=False, centre='mean'):
    """The seeds' mean (or median) and, with >= 2 seeds, the 95% t-interval of the mean as a
    band; thin: each seed's own line too. -> whether anything was drawn."""
    runs_series = [s for s in runs_series if s]
    if not runs_series:
        return False
    xs, ys = across(runs_series)
    if not len(xs):
        return False
    if thin and len(ys) > 1:
        for s in runs_series:
            ax.plot(*zip(*sorted(s.items())), style, color=color, lw=0.7, alpha=0.35)
    middle = np.median(ys, axis=0) if centre == 'median' else ys.mean(axis=0)
    ax.plot(xs, middle, style, color=color, lw=1.8 if thin else 1.3, label=label)
    if len(ys) > 1 and centre == 'mean':
        half = stats.t95(len(ys) - 1) * ys.std(axis=0, ddof=1) / np.sqrt(len(ys))
        ax.fill_between(xs, middle - half, middle + half, color=color, alpha=0.18, lw=0)
    return True


def same_curve(a, b):
    """Whether two curves ({x: y}) are one: the same x, the same y."""
    return a.keys() == b.keys() and np.allclose([a[x] for x in a], [b[x] for x in a],
                                                rtol=1e-9, atol=0)


def schedule(ax, settings, key, style, colors):
    """One schedule (lr or m) per setting, from its first seed (a schedule is the same for every
    seed), each distinct curve drawn once: in black where every setting has it, else in the
    colour of the first setting that has it -> a note for the title where curves were merged."""
    groups = []                               # [curve, colour, settings that have it]
    for c, runs in zip(colors, settings.values()):
        curve = series(runs[0][0], 'step', key)
        match = next((g for g in groups if same_curve(g[0], curve)), None)
        if match:
            match[2] += 1
        elif curve:
            groups.append([curve, c, 1])
    if len(groups) == 1 and groups[0][2] > 1:
        groups[0][1] = 'k'
    for curve, c, _ in groups:
        ax.plot(*zip(*sorted(curve.items())), style, color=c)
    if len(groups) == 1 and len(settings) > 1:
        return f'{key}: the same for every setting'
    if len(groups) < len(settings):
        return f'{key}: {len(groups)} curves for {len(settings)} settings (drawn once each)'
    return ''


def spike_points(steps):
    """The logged spikes -> [(step, norm)]: the step train_pretrain.py names, at the largest norm
    of its layer in the logged interval (the spike's own at --print-freq 1)."""
    points = []
    for r in steps:
        if r.get('spike'):
            y = r.get(r['spike'] + '_max', r.get(r['spike']))
            points.append((r.get('spike_step', r['step']), y))
    return points


def plot_runs(run_dirs, labels=None, out=None, title=None, paper=None, against=()):
    """The runs in four panels, one colour per setting (the runs that share a label) -> the
    Figure (also a PNG at out). paper: a line saying the paper's gap, written on panel (b);
    against: runs drawn in black over the settings' bands."""
    labels = run_labels(run_dirs, labels)
    settings = by_setting([read_log(d) for d in run_dirs], labels)
    colors = [f'C{i % 10}' for i in range(len(settings))]
    fig, ((ax_loss, ax_knn), (ax_lr, ax_grad)) = plt.subplots(2, 2, figsize=(11, 8.5))
    ax_m = ax_lr.twinx()                      # m ~ 0.9..1 and lr ~ 1e-3: one axis each
    drew = dict.fromkeys((ax_loss, ax_knn, ax_lr, ax_grad), False)
    key = []                                  # the figure legend's entries
    several = any(len(runs) > 1 for runs in settings.values())
    frozen, spiked = [], False
    for c, (label, runs) in zip(colors, settings.items()):
        steps = [s for s, _ in runs]
        epochs = [e for _, e in runs]
        seeds = f' ({len(runs)} seeds)' if len(runs) > 1 else ''
        key.append(Line2D([], [], color=c, lw=2, label=label + seeds))
        drew[ax_loss] |= band(ax_loss, [series(s, 'step', 'loss') for s in steps], c)
        drew[ax_knn] |= band(ax_knn, [series(e, 'epoch', 'knn_top1') for e in epochs], c,
                             style='o-', thin=True)
        first = band(ax_grad, [series(s, 'step', 'grad_first') for s in steps], c,
                     centre='median')
        last = band(ax_grad, [series(s, 'step', 'grad_last') for s in steps], c, style='--',
                    centre='median')
        drew[ax_grad] |= first or last
        if last and not first:                # a frozen patch projection has no gradient
            frozen.append(Line2D([], [], color=c, ls='', marker='s',
                                 label=f'{label}: first layer frozen, no gradient'))
        points = [p for s in steps for p in spike_points(s)]
        if points:                            # scatter, not plot: ax_grad.lines stay the curves
            ax_grad.scatter(*zip(*points), marker='x', s=60, color=c, zorder=3)
            spiked = True
    for d in against:                         # the student's own runs, in black, on top
        steps, epochs = read_log(d)
        name = os.path.basename(os.path.normpath(d))
        key.append(Line2D([], [], color='k', lw=2.2, label=f'{name} (--against)'))
        drew[ax_loss] |= band(ax_loss, [series(steps, 'step', 'loss')], 'k')
        drew[ax_knn] |= band(ax_knn, [series(epochs, 'epoch', 'knn_top1')], 'k', style='o-')
        drew[ax_grad] |= band(ax_grad, [series(steps, 'step', 'grad_first')], 'k')
        drew[ax_grad] |= band(ax_grad, [series(steps, 'step', 'grad_last')], 'k', style='--')
        points = spike_points(steps)
        if points:
            ax_grad.scatter(*zip(*points), marker='x', s=60, color='k', zorder=3)
            spiked = True

    # ------------------------------------------------------------------------- (b) random init
    first_setting = next(iter(settings.values()), [])
    init = [r['knn_top1'] for _, e in first_setting for r in e
            if r['epoch'] == 0 and r.get('knn_top1') is not None]
    if init:                                  # epoch 0 is measured on the same images
        ax_knn.axhline(statistics.fmean(init), color='gray', ls=':', lw=1.2)
        key.append(Line2D([], [], color='gray', ls=':', label='random init (epoch 0)'))
    if several:
        key += [Patch(color='gray', alpha=0.3, label='band: 95% interval of the mean'),
                Line2D([], [], color='gray', lw=0.7, label='(b) thin: one seed')]

    # ------------------------------------------------------------------------- (c) schedules
    notes = []                                # where curves that coincide were merged
    if settings:
        notes = [schedule(ax_lr, settings, 'lr', '-', colors),
                 schedule(ax_m, settings, 'm', '--', colors)]
        drew[ax_lr] = bool(ax_lr.lines or ax_m.lines)
    same = ''.join(f'\n{note}' for note in notes if note)

    ax_loss.set(title='(a) training loss' + (', mean over seeds' if several else ''),
                xlabel='iteration', ylabel='loss')
    ax_knn.set(xlabel='epoch (0 = random init)', ylabel='kNN top-1 (%)')
    ax_knn.set_title('(b) kNN top-1 accuracy' + ('\n' + paper if paper else ''),
                     fontsize='medium' if not paper else 'small')
    ax_knn.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set(xlabel='iteration', ylabel='learning rate (solid)')
    ax_lr.set_title(f'(c) schedules: lr (solid), momentum m (dashed){same}',
                    fontsize='medium' if not same else 'small')
    ax_m.set_ylabel('momentum m (dashed)')
    ax_grad.set(title='(d) gradient norm (Fig. 4)' + (', median over seeds' if several else ''),
                xlabel='iteration', ylabel='gradient norm')
    if drew[ax_grad]:
        ax_grad.set_yscale('log')             # a spike is 10x the median: log shows it and the rest
        key += [Line2D([], [], color='k', label='(d) first layer'),
                Line2D([], [], color='k', ls='--', label='(d) last block')]
        if spiked:
            key.append(Line2D([], [], color='k', ls='', marker='x',
                              label='(d) spike: 10x its running median'))
        key += frozen
    for ax, has in drew.items():
        if not has:
            ax.text(0.5, 0.5, 'no data', transform=ax.transAxes, ha='center', va='center',
                    color='gray', fontsize='large')
    if not ax_m.lines:
        ax_m.set_yticks([])
    if title:
        fig.suptitle(title)
    # One legend for the figure, below the panels: it covers no curve and no tick label.
    ncol = 3
    rows = -(-len(key) // ncol)
    fig.legend(handles=key, loc='lower center', ncol=ncol, fontsize='small', frameon=False)
    fig.tight_layout(rect=(0, 0.025 * rows + 0.01, 1, 1))
    if out:
        fig.savefig(out, dpi=110)
    return fig


# ----------------------------------------------------------------------------- the table
def fmt(v, digits):
    return MISSING if v is None else f'{v:.{digits}f}'


def values(numbers, key):
    return [n[key] for n in numbers if n[key] is not None]


def summary_table(run_dirs, labels=None):
    """One markdown row per setting (the runs that share a label): its seeds; the final and the
    random-init kNN top-1, each the mean +- its 95% interval over the seeds (one seed: the
    value); the mean final loss; the runs with a logged spike, first / last layer, and the
    largest spike's ratio to its running median; the steps trained."""
    labels = run_labels(run_dirs, labels)
    lines = ['| setting | seeds | final kNN top-1 (%) | kNN at init (%) | final loss_avg '
             '| runs with a spike (first / last layer) | largest spike (x median) | steps |',
             '|---|---|---|---|---|---|---|---|']
    for label, numbers in by_setting([run_numbers(d) for d in run_dirs], labels).items():
        final, init, loss = (values(numbers, k) for k in ('final', 'init', 'loss'))
        spikes = [sum(n['spikes'][k] > 0 for n in numbers) for k in LAYERS]
        cells = [label,
                 ', '.join(str(n['seed']) for n in numbers),
                 stats.fmt_interval(final) if final else MISSING,
                 stats.fmt_interval(init) if init else MISSING,
                 fmt(statistics.fmean(loss) if loss else None, 4),
                 f'{spikes[0]} / {spikes[1]} of {len(numbers)}',
                 fmt(max(values(numbers, 'spike_ratio'), default=None), 1),
                 str(max(n['steps'] for n in numbers))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Plot train_pretrain.py runs (log.jsonl).')
    parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                        help='a train_pretrain.py --output-dir, holding log.jsonl')
    parser.add_argument('--labels', nargs='+',
                        help='legend names, one per run; runs with the same name are seeds of '
                             'one setting (default: the dir names less a _s<seed> suffix)')
    parser.add_argument('--against', nargs='+', default=[], metavar='RUN_DIR',
                        help='runs drawn in black over the others (e.g. your own, while it trains)')
    parser.add_argument('-o', '--out', help='the PNG to write (default: FIRST_RUN_DIR/plot.png)')
    parser.add_argument('--title', help='a title above the four panels')
    parser.add_argument('--table', action='store_true', help='also print a markdown summary table')
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.run_dirs[0], 'plot.png')
    plt.close(plot_runs(args.run_dirs, args.labels, out, args.title, against=args.against))
    print(out)
    if args.table:
        print(summary_table(args.run_dirs, args.labels))


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:        # a user error: one line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)

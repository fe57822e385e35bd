"""What every lab shares: run train_pretrain.py for each setting of a study and each seed, on the
built-in demo images (`--preset demo`: a 4-block ViT, 32-px shapes); draw the runs (plot.py); turn
the paired seeds into intervals and verdicts (stats.py); write the table. A lab file names its
settings (RUNS) and the paper's gaps (PAPER) and calls main(); the study itself is in the flags.

    python labs/<study>.py --fresh      # one seed of each setting, trained: a student's minutes
    python labs/<study>.py --seeds 5    # the reference: seeds 0..4, paired (labs/results/)
    python labs/<study>.py --smoke      # seconds: the same commands on a 1-block ViT, 40 images
    python labs/_lab.py                 # LABS.md's generated tables again, from labs/results

Seed s is the same seed for every setting: train_pretrain.py --seed s gives them the same batch
order, augmentations and (where the shapes agree) initial weights, so that a difference between
two settings at one seed is a paired difference. A finished run is never trained twice: one with
the same command, seed and dtype is taken from output/labs/runs/ or from the logs committed in
labs/results/<study>/<run>/ (its config.json and result.json say what it was).
"""
import argparse
import glob
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the built-in images)
import launch  # noqa: E402  (which dtype this CPU computes natively)
from launch import UserError  # noqa: E402
import plot  # noqa: E402
import stats  # noqa: E402

RESULTS = os.path.join(HERE, 'results')
LABS_MD = os.path.join(ROOT, 'LABS.md')
STUDIES = ('instability', 'position_embedding', 'class_token', 'head_bn', 'predictor', 'momentum',
           'frameworks', 'optimizer', 'training_length')               # LABS.md's order
# Each run: 2 demo epochs (78 steps). The baseline's kNN gain over the random init is then
# several times the run-to-run spread, and one seed of a 3-setting lab fits a student's 15 minutes
# on 2 cores (LABS.md, "The scale"). One run at a time with every thread, so that each run's
# minutes are its own.
EPOCHS, JOBS = 2, 1
# The reference: labs/results and LABS.md take a lab's figure and table from this many seeds on
# (a lab's SWEEP from its SWEEP_SEEDS), and never from fewer than they hold.
REFERENCE_SEEDS = 5
# Every run gets a full schedule whatever its length: the lr warms up over this fraction of the
# run, then decays on a half-cosine to ~0 at its last step (a 1-epoch run too).
WARMUP = 0.25
# The kNN monitor's images: the demo's 500 training images per class (the same files) and 400
# held-out per class, the demo's 100 and 300 more: 4,000, so that the measurement's own binomial
# standard error is <= 0.8 points (at 50%: 100 x sqrt(0.25 / 4000) = 0.79).
LAB_DATA, LAB_VAL = os.path.join('data', 'moco_lab'), 400
# --smoke: a 1-block, 32-wide ViT, 4 images of each of the 10 classes, 2 steps an epoch. It comes
# after a lab's flags, so that a lab's own batch size or width cannot make the smoke test slow.
SMOKE_DATA, SMOKE_DATA_DIR = (4, 2), os.path.join('data', 'moco_smoke')   # per class
SMOKE = ['--depth', '1', '--embed-dim', '32', '--num-heads', '2', '--moco-mlp-dim', '64',
         '--moco-dim', '16', '-b', '20', '--workers', '0']


def parse_args(doc, sweep, argv=None):
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--seeds', type=int, default=1,
                   help='seeds 0..S-1 of every setting, paired (a student: 1; the reference: 5)')
    p.add_argument('--smoke', action='store_true', help='seconds: a tiny ViT on 40 images (CI)')
    p.add_argument('--epochs', type=int, default=EPOCHS, help="each run's (unless it sets its own)")
    p.add_argument('--dtype', choices=('bf16', 'fp32'),
                   help='of every run (default: bf16 where the CPU computes it natively, else '
                        'fp32); runs of another dtype are not reused nor compared')
    p.add_argument('--jobs', type=int, default=JOBS,
                   help='runs at once; the CPU threads are shared out between them (their '
                        'minutes are then not one run\'s alone)')
    p.add_argument('--fresh', action='store_true',
                   help='train every run again, even one finished before with the same command '
                        '(in output/labs/runs or committed in labs/results)')
    p.add_argument('--out', help='runs, figure and table (default: the runs in output/labs/runs, '
                                 'the figure, table and logs in labs/results; --smoke: a '
                                 'temporary folder)')
    p.add_argument('--reference', default=RESULTS,
                   help='where finished runs are looked up besides the runs folder: '
                        '<reference>/<study>/<run>/')
    p.add_argument('--inspect', action='store_true',
                   help="also draw each setting's seed-0 features (labs/look.py): neighbours, "
                        'attention, patch components, feature space')
    if sweep:
        p.add_argument('--sweep', action='store_true',
                       help="this lab's sweep (SWEEP in its file) instead of its settings")
    args = p.parse_args(argv)
    if min(args.jobs, args.epochs, args.seeds) < 1:
        raise UserError('--jobs, --epochs and --seeds must be at least 1')
    return args


# ----------------------------------------------------------------------------- the plan
def run_name(flags, epochs, seed):
    """The run's folder, from its flags, length and seed: runs with the same command are shared
    between labs, and the seeds of a setting differ in the suffix alone (plot.py groups so)."""
    name = '_'.join(f.lstrip('-') for f in flags) or 'default'
    return ''.join(c if c.isalnum() or c in '.-' else '_' for c in name) + f'_e{epochs}_s{seed}'


def plan(runs, seeds, epochs, data_dir, run_root, dtype, smoke=False):
    """{label: flags} -> one dict per (seed, setting), seed by seed (a lab stopped half-way has
    whole pairs): label, seed, epochs, dir and the train_pretrain.py command (--preset demo on
    data_dir, kNN on its held-out images every epoch, every step logged, the lab's warm-up, seed and
    dtype; epochs unless the flags give their own)."""
    todo = []
    for seed in range(seeds):
        for label, flags in runs.items():
            flags, run_epochs = list(flags), epochs
            if '--epochs' in flags:                     # a run of its own length
                i = flags.index('--epochs')
                run_epochs = int(flags.pop(i + 1))
                flags.pop(i)
            run_dir = os.path.join(run_root, run_name(flags, run_epochs, seed))
            command = [sys.executable, 'train_pretrain.py', '--preset', 'demo', data_dir,
                       '--knn-data', data_dir, '--knn-every', '1', '--epochs', str(run_epochs),
                       '--warmup-epochs', f'{WARMUP * run_epochs:g}', '--seed', str(seed),
                       '--dtype', dtype, '--print-freq', '1',
                       '--output-dir', os.path.relpath(run_dir, ROOT)] + flags
            todo.append(dict(label=label, seed=seed, epochs=run_epochs, dir=run_dir,
                             command=command + (SMOKE if smoke else [])))
    return todo


def said(command):
    """What a run is, as its command says it: the script and its flags, less the interpreter and
    the folder it writes to (the same run may be found in another folder)."""
    words = list(command[1:])
    i = words.index('--output-dir')
    return ' '.join(words[:i] + words[i + 2:])


def cpu_model():
    """The CPU's name, as /proc/cpuinfo says it (Linux), else what Python knows."""
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


# ----------------------------------------------------------------------------- running
RUN_FILES = ('log.jsonl', 'config.json', 'result.json')


def finished(run_dir, run, dtype):
    """Whether run_dir holds this run, ended: its result.json names the same command and its
    config.json the same seed and dtype; a run that failed (not one that diverged, a result of
    the study) is not reused."""
    result = plot.read_json(os.path.join(run_dir, 'result.json'))
    config = plot.read_json(os.path.join(run_dir, 'config.json'))
    return (result is not None and config is not None
            and os.path.isfile(os.path.join(run_dir, 'log.jsonl'))
            and result.get('command') == said(run['command'])
            and config.get('seed') == run['seed'] and config.get('dtype') == dtype
            and (result.get('error') is None or 'nan or inf' in result['error']))


def train(run, threads, dtype, fresh, reference):
    """One train_pretrain.py run -> its result.json (minutes, error line or None, the machine)
    and where it came from: 'trained', 'reused' (the runs folder) or 'committed' (copied from
    <reference>/<study>/<run>/). A run whose loss became nan or inf is a result of the study
    (its log stays), not a failure of the lab."""
    run_dir = run['dir']
    if not fresh:
        if finished(run_dir, run, dtype):
            return plot.read_json(os.path.join(run_dir, 'result.json')), 'reused'
        name = os.path.basename(run_dir)
        for kept in sorted(glob.glob(os.path.join(reference, '*', name))):
            if finished(kept, run, dtype):
                shutil.rmtree(run_dir, ignore_errors=True)
                os.makedirs(run_dir)
                for f in RUN_FILES:
                    shutil.copy(os.path.join(kept, f), run_dir)
                return plot.read_json(os.path.join(run_dir, 'result.json')), 'committed'
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tic = time.time()
    with open(os.path.join(run_dir, 'train.out'), 'w') as out:
        rc = subprocess.run(run['command'], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    lines = open(os.path.join(run_dir, 'train.out')).read().strip().splitlines() or ['no output']
    # The machine, and how busy it was: a 5-minute load average above the threads this lab
    # uses means other work ran beside the run, and its minutes are not its own.
    result = dict(command=said(run['command']), minutes=(time.time() - tic) / 60,
                  error=None if rc.returncode == 0 else lines[-1], cpu=cpu_model(),
                  cores=os.cpu_count(), threads=threads, load5=os.getloadavg()[1],
                  finished=time.strftime('%Y-%m-%d %H:%M'))
    with open(os.path.join(run_dir, 'result.json'), 'w') as f:
        json.dump(result, f, indent=1)
    return result, 'trained'


# ----------------------------------------------------------------------------- the numbers
def compared(lab):
    """The lab's comparisons: (setting, the setting it is compared with, the paper's gap) for
    every setting but the baseline (the first), compared with the baseline unless AGAINST names
    another."""
    baseline = next(iter(lab.RUNS))
    for label in lab.RUNS:
        against = getattr(lab, 'AGAINST', {}).get(label, baseline)
        if label != against:
            yield label, against, lab.PAPER.get(label)


def numbers(lab, todo, done):
    """The runs' numbers and the lab's comparisons: the same dict feeds the table, the figure's
    text, the results .json and LABS.md's summary."""
    baseline = next(iter(lab.RUNS))
    settings = {label: {} for label in lab.RUNS}
    for run in todo:
        result, source = done[run['dir']]
        settings[run['label']][run['seed']] = dict(
            run=os.path.basename(run['dir']), source=source, **plot.run_numbers(run['dir']),
            **{k: result.get(k) for k in ('minutes', 'error', 'cpu', 'threads', 'load5')})
    final = {label: {s: r['final'] for s, r in runs.items() if r['final'] is not None}
             for label, runs in settings.items()}
    comparisons = []
    for label, against, paper in compared(lab):
        diffs = stats.paired(final[label], final[against])
        kind, verdict = stats.verdict(diffs, paper)
        comparisons.append(dict(setting=label, against=against, paper=paper, diffs=diffs,
                                kind=kind, verdict=verdict))
    return dict(study=lab.__name__, title=lab.TITLE, finding=lab.FINDING, baseline=baseline,
                settings=settings, comparisons=comparisons)


def paper_text(paper):
    """The paper's claim in a table: its gap ('-1.0'), its direction alone ('lower'), or '—'."""
    if paper is None:
        return plot.MISSING
    if paper in ('+', '-'):
        return 'higher' if paper == '+' else 'lower'
    return f'{paper:+.1f}'


def diff_text(c):
    return stats.fmt_interval(c['diffs'], signed=True) if c['diffs'] else plot.MISSING


def table(result):
    """The lab's markdown table: one row per setting."""
    comparisons = {c['setting']: c for c in result['comparisons']}
    lines = ['| setting | seeds | final kNN top-1 (%) | kNN at init (%) | paired difference '
             '(points) | the paper (points) | verdict | runs with a spike (first / last layer) '
             '| minutes per run |', '|---|---|---|---|---|---|---|---|---|']
    for label, runs in result['settings'].items():
        final = [r['final'] for r in runs.values() if r['final'] is not None]
        init = [r['init'] for r in runs.values() if r['init'] is not None]
        minutes = [r['minutes'] for r in runs.values() if r['minutes'] is not None]
        spikes = [sum(r['spikes'][k] > 0 for r in runs.values()) for k in plot.LAYERS]
        c = comparisons.get(label)
        vs = f'{diff_text(c)} vs {c["against"]}' if c else '(baseline)'
        cells = [label, str(len(final)),
                 stats.fmt_interval(final) if final else plot.MISSING,
                 stats.fmt_interval(init) if init else plot.MISSING,
                 vs, paper_text(c['paper']) if c else plot.MISSING,
                 c['verdict'] if c else plot.MISSING,
                 f'{spikes[0]} / {spikes[1]} of {len(runs)}',
                 f'{sum(minutes) / len(minutes):.1f}' if minutes else plot.MISSING]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def machine_text(result, jobs):
    """Where and how the minutes were measured, and the CPU time of the lab's runs."""
    runs = [r for runs in result['settings'].values() for r in runs.values()]
    machines = sorted({f'{r["cpu"]}, {r["threads"]} thread(s)' for r in runs if r.get('cpu')})
    minutes = sum(r['minutes'] or 0 for r in runs)
    cpu = sum((r['minutes'] or 0) * (r['threads'] or 1) for r in runs)
    busy = [f'{r["run"]} (load {r["load5"]:.1f})' for r in runs
            if r.get('load5') is not None and r['load5'] > (r['threads'] or 1) * jobs + 0.5]
    text = (f'Minutes: the wall time of each run, {jobs} at a time, on '
            f'{"; ".join(machines) or "?"}; {len(runs)} runs, {minutes:.0f} minutes in all '
            f'({cpu:.0f} CPU-minutes; a run shared with other labs counts in each).')
    if busy:
        text += (' Measured beside other work (5-minute load above the threads in use), '
                 'so slower than alone: ' + ', '.join(busy) + '.')
    return text


def report(result, todo, dtype, jobs, held_out, smoke):
    """The lab's markdown: the paper's finding, the table, how to read it, the machine, the
    commands of the first seed."""
    seeds = sorted({run['seed'] for run in todo})
    diverged = [f'- {label}, seed {s}: {r["error"]}' for label, runs in result['settings'].items()
                for s, r in runs.items() if r['error']]
    base = result['baseline']
    first = [run for run in todo if run['seed'] == seeds[0]]
    return (f'**The paper:** {result["finding"]}\n\n' + table(result) + '\n\n'
            + ('Diverged (left out of the means; the loss became nan or inf):\n'
               + '\n'.join(diverged) + '\n\n' if diverged else '')
            + f'Seeds {seeds[0]}..{seeds[-1]}, paired: seed s of every setting has the same '
            f'batch order, augmentations and, where the shapes agree, initial weights. Mean ± '
            f'95% t-interval over the seeds (one seed: its value); the paired difference is each '
            f"seed's setting minus the same seed's run of the setting named ({base} unless "
            f'another), and the verdict follows labs/stats.py. kNN top-1 (k = 20, τ = 0.07) '
            f'after the last epoch, on {held_out:,} held-out images (the measurement alone: '
            f'binomial s.e. {stats.binomial_se(50, held_out):.1f} points at 50%); {dtype}.'
            + (' (--smoke)' if smoke else '') + '\n\n'
            + machine_text(result, jobs) + '\n\n'
            + f'Commands of seed {seeds[0]} (seed s: `--seed s`, folder `_s<s>`), from the '
            'repository root:\n\n'
            + ''.join(f'    python {said(run["command"])}\n' for run in first))


# ----------------------------------------------------------------------------- LABS.md
def block(text, name, content):
    """text with the block between `<!-- begin: name -->` and `<!-- end: name -->` replaced by
    content; unchanged if the markers are not there."""
    begin, end = f'<!-- begin: {name} -->', f'<!-- end: {name} -->'
    if begin not in text or end not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + '\n' + content.strip() + '\n' + end + rest.split(end, 1)[1]


def summary(results):
    """LABS.md's summary table, one row per comparison, from the labs' result dicts (a lab not
    run yet: one row that says so)."""
    lines = ['| lab | comparison | the paper (points) | here: paired difference (kNN points) '
             '| seeds | verdict |', '|---|---|---|---|---|---|']
    for study in STUDIES:
        result = results.get(study)
        if result is None:                              # what the lab will compare
            for label, against, paper in compared(importlib.import_module(study)):
                lines.append(f'| {study} | {label} − {against} | {paper_text(paper)} | not run '
                             f'yet | 0 | `python labs/{study}.py --seeds 5` |')
            continue
        for c in result['comparisons']:
            lines.append(f'| {study} | {c["setting"]} − {c["against"]} | '
                         f'{paper_text(c["paper"])} | {diff_text(c)} | {len(c["diffs"])} | '
                         f'{c["verdict"]} |')
    return '\n'.join(lines)


def write_labs_md(results_dir=RESULTS, labs_md=LABS_MD):
    """LABS.md's generated blocks from results_dir/<name>.json, .md and .png, as a lab wrote them:
    each lab's figure and table (and the instability sweep's), and the summary table."""
    results = {s: plot.read_json(os.path.join(results_dir, f'{s}.json')) for s in STUDIES}
    results = {s: r for s, r in results.items() if r is not None}
    text = open(labs_md).read()
    for name in (*STUDIES, 'instability_sweep'):
        path = os.path.join(results_dir, name)
        if os.path.isfile(path + '.json'):
            rel = os.path.relpath(path, ROOT)
            content = f'![{name}]({rel}.png)\n\n' + open(path + '.md').read()
        else:
            command = name.replace('_sweep', '.py --sweep --seeds 2') if 'sweep' in name \
                else f'{name}.py --seeds 5'
            content = f'*Not run yet at this scale:* `python labs/{command}` writes it here.'
        text = block(text, name, content)
    text = block(text, 'summary', summary(results))
    with open(labs_md, 'w') as f:
        f.write(text)


# ----------------------------------------------------------------------------- the lab
def run_lab(study, argv=None):
    """study: a lab's module name (its RUNS, PAPER, TITLE, FINDING and docstring; optionally
    AGAINST, the run a setting is compared with, and SWEEP, settings run by --sweep)."""
    lab = importlib.import_module(study)
    args = parse_args(lab.__doc__, hasattr(lab, 'SWEEP'), argv)
    if getattr(args, 'sweep', False):             # the same machinery, the sweep's settings
        lab = argparse.Namespace(__name__=f'{study}_sweep', RUNS=lab.SWEEP, PAPER={},
                                 TITLE=lab.SWEEP_TITLE, FINDING=lab.FINDING,
                                 REFERENCE_SEEDS=lab.SWEEP_SEEDS)
    dtype = args.dtype or ('bf16' if launch.cpu_has_native_bf16() else 'fp32')
    tmp = tempfile.mkdtemp(prefix=f'lab_{study}_') if args.smoke and not args.out else None
    out = args.out or tmp
    run_root = os.path.join(out, 'runs') if out else os.path.join(ROOT, 'output', 'labs', 'runs')
    # The images, at a path relative to the repository: the same command on every machine.
    data_dir = SMOKE_DATA_DIR if args.smoke else LAB_DATA
    data.build_demo_dataset(os.path.join(ROOT, data_dir),
                            *(SMOKE_DATA if args.smoke else (data.DEMO_TRAIN, LAB_VAL)))
    if args.smoke:                                      # in --out, if given: runs can be reused
        args.epochs = min(args.epochs, 2)
    held_out = len(glob.glob(os.path.join(ROOT, data_dir, 'val', '*', '*.png')))
    todo = plan(lab.RUNS, args.seeds, args.epochs, data_dir, run_root, dtype, args.smoke)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f'{lab.__name__}: {len(lab.RUNS)} settings x {args.seeds} seed(s), {args.jobs} at a '
          f'time, {threads} thread(s) each, {dtype}', flush=True)
    unique = list({run['dir']: run for run in todo}.values())   # a run two labels share

    def one(run):
        result, source = train(run, threads, dtype, args.fresh, args.reference)
        sys.stdout.write(f'  {os.path.basename(run["dir"])}: {result["minutes"]:.1f} min'
                         + ('' if source == 'trained' else f' ({source})')
                         + (f' ({result["error"]})' if result['error'] else '') + '\n')
        sys.stdout.flush()                              # one write: whole lines from threads
        return result, source

    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip([run['dir'] for run in unique], pool.map(one, unique)))
    for run in unique:
        error = done[run['dir']][0]['error']
        if error and 'nan or inf' not in error:
            raise UserError(f'the run {run["dir"]} failed: {error} (see its train.out)')

    # ------------------------------------------------------------------------- figure, table
    result = numbers(lab, todo, done)
    name = result['study']
    old = plot.read_json(os.path.join(RESULTS, f'{name}.json'))
    old_seeds = max((len(r) for r in old['settings'].values()), default=0) if old else 0
    least = max(getattr(lab, 'REFERENCE_SEEDS', REFERENCE_SEEDS), old_seeds)
    reference = not out and args.seeds >= least         # never a student's run, nor fewer
    where = out or (RESULTS if reference else os.path.join(ROOT, 'output', 'labs'))
    os.makedirs(where, exist_ok=True)
    png, md, js = (os.path.join(where, f'{name}.{ext}') for ext in ('png', 'md', 'json'))
    gaps = [f'{c["setting"]}: paper {paper_text(c["paper"])}, here {diff_text(c)}'
            for c in result['comparisons']]
    plot.plt.close(plot.plot_runs([run['dir'] for run in todo], [run['label'] for run in todo],
                                  out=png, title=lab.TITLE,
                                  paper='\n'.join(gaps) + ' (points)' if gaps else None))
    with open(md, 'w') as f:
        f.write(report(result, todo, dtype, args.jobs, held_out, args.smoke))
    with open(js, 'w') as f:
        json.dump(dict(result, dtype=dtype, epochs=args.epochs, seeds=args.seeds,
                       held_out=held_out), f, indent=1)
    if reference:                     # the logs beside the figure: re-plottable, and reused
        for run in unique:
            keep = os.path.join(RESULTS, name, os.path.basename(run['dir']))
            os.makedirs(keep, exist_ok=True)
            for f in RUN_FILES:
                shutil.copy(os.path.join(run['dir'], f), keep)
        write_labs_md()
    if args.inspect:
        inspect_runs(todo, os.path.join(ROOT, data_dir), os.path.join(where, f'{name}_look'))
    print(f'{name}: wrote {png} and {md}' + ('' if reference or out else
          f' (labs/results takes {least} seeds or more)'), flush=True)
    if tmp:                                             # --smoke without --out: nothing stays
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def inspect_runs(todo, data_dir, where):
    """labs/look.py's figures of each setting's seed-0 checkpoint, in where/<run>/. A run reused
    from labs/results kept its logs, not its weights: said, and skipped."""
    import look                                         # matplotlib: only when asked
    for run in todo:
        ckpt = os.path.join(run['dir'], 'checkpoint_last.pth')
        if run['seed'] != 0:
            continue
        if not os.path.isfile(ckpt):
            print(f'  {run["label"]}: no checkpoint (reused logs), nothing to draw', flush=True)
            continue
        look.main([ckpt, data_dir, '-o', os.path.join(where, os.path.basename(run['dir']))])


def main(study):
    """run_lab with a user error as one line and exit status 1."""
    launch.exit_on_user_error(lambda: run_lab(study))


if __name__ == '__main__':                              # LABS.md's tables, from labs/results
    write_labs_md()
    print(f'rewrote the generated blocks of {LABS_MD}')

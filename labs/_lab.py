"""What every lab shares: run train_pretrain.py once per setting of a study on the built-in demo
images (`--preset demo`: a 4-block ViT, 32-px shapes), then draw the runs (plot.py) and write their
table. A lab file names its settings and calls run_lab(); the study itself is in the flags.

    python labs/<study>.py            # the lab: runs -> output/labs/runs/, the figure, table and
                                      # logs -> labs/results/ (<= 15 minutes on 2 CPU cores)
    python labs/<study>.py --smoke    # seconds: the same commands on a 1-block ViT and 40 images
"""
import argparse
import json
import os
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
import plot  # noqa: E402

RESULTS = os.path.join(HERE, 'results')
# Each run's length: 2 demo epochs (78 steps), ~3 minutes on 2 cores, so that a lab of 3 runs stays
# inside its 15 minutes. One run at a time with both threads, so that each run's minutes are its own
# (on this 2-core machine: ~60 images/s so; two 1-thread runs side by side, 32-44 each).
EPOCHS, JOBS = 2, 1
# --smoke: a 1-block, 32-wide ViT, 4 images of each of the 10 classes, 2 steps an epoch. It comes
# after a lab's flags, so that a lab's own batch size or width cannot make the smoke test slow.
SMOKE_DATA = (4, 2)                                   # train and val images per class
SMOKE = ['--depth', '1', '--embed-dim', '32', '--num-heads', '2', '--moco-mlp-dim', '64',
         '--moco-dim', '16', '-b', '20', '--workers', '0']


def parse_args(doc):
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--smoke', action='store_true', help='seconds: a tiny ViT on 40 images (CI)')
    p.add_argument('--epochs', type=int, default=EPOCHS, help="each run's (unless it sets its own)")
    p.add_argument('--jobs', type=int, default=JOBS,
                   help='runs at once; the CPU threads are shared out between them')
    p.add_argument('--fresh', action='store_true',
                   help='train every run again, even one an earlier lab finished with the same '
                        'command (the default run is shared by most labs)')
    p.add_argument('--out', help='runs, figure and table (default: the runs in output/labs/runs, '
                                 'the figure, table and logs in labs/results; --smoke: a '
                                 'temporary folder)')
    return p.parse_args()


def run_name(flags, epochs):
    """The run's folder, from its flags: runs with the same command are shared between labs."""
    name = '_'.join(f.lstrip('-') for f in flags) or 'default'
    return ''.join(c if c.isalnum() or c in '.-' else '_' for c in name) + f'_e{epochs}'


def train(command, run_dir, threads, fresh):
    """One train_pretrain.py run -> (minutes, None or its error line, reused). A run whose loss
    became nan or inf is a result of the study (its log stays), not a failure of the lab; a run
    finished before with the same command is reused unless fresh."""
    command_file = os.path.join(run_dir, 'command.txt')
    result_file = os.path.join(run_dir, 'result.json')     # written once the run has ended
    said = ' '.join(command[1:])
    if not fresh and os.path.isfile(result_file) and open(command_file).read() == said:
        result = json.load(open(result_file))
        return result['minutes'], result['error'], True
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    with open(command_file, 'w') as f:
        f.write(said)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tic = time.time()
    with open(os.path.join(run_dir, 'train.out'), 'w') as out:
        rc = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    lines = open(os.path.join(run_dir, 'train.out')).read().strip().splitlines() or ['no output']
    result = dict(minutes=(time.time() - tic) / 60,
                  error=None if rc.returncode == 0 else lines[-1])
    with open(result_file, 'w') as f:
        json.dump(result, f)
    return result['minutes'], result['error'], False


def plan(runs, epochs, data_dir, run_root, smoke=False):
    """{label: flags} -> {label: (train_pretrain.py command, run folder)}: --preset demo on
    data_dir, every step logged (--smoke) or every 2nd, epochs unless the flags give their own."""
    plans = {}
    for label, flags in runs.items():
        flags, run_epochs = list(flags), epochs
        if '--epochs' in flags:                         # a run of its own length
            i = flags.index('--epochs')
            run_epochs = int(flags.pop(i + 1))
            flags.pop(i)
        run_dir = os.path.join(run_root, run_name(flags, run_epochs))
        plans[label] = ([sys.executable, 'train_pretrain.py', '--preset', 'demo', data_dir,
                         '--print-freq', '1' if smoke else '2', '--epochs', str(run_epochs),
                         '--output-dir', os.path.relpath(run_dir, ROOT)]
                        + flags + (SMOKE if smoke else []), run_dir)
    return plans


def run_lab(study, runs, doc, title, finding):
    """study: the lab's file name; runs: {label: [train_pretrain.py flags]}; doc: the lab's
    docstring (its --help); title: the figure's; finding: the paper's, written above the table."""
    args = parse_args(doc)
    if args.jobs < 1 or args.epochs < 1:
        raise ValueError('--jobs and --epochs must be at least 1')
    tmp = tempfile.mkdtemp(prefix=f'lab_{study}_') if args.smoke and not args.out else None
    out = args.out or tmp
    run_root = os.path.join(out, 'runs') if out else os.path.join(ROOT, 'output', 'labs', 'runs')
    results = out or RESULTS
    if args.smoke:                                      # in --out, if given: runs can be reused
        data_dir = data.build_demo_dataset(os.path.join(out, 'smoke_data'), *SMOKE_DATA)
        args.epochs = min(args.epochs, 2)
    else:
        data_dir = data.build_demo_dataset()
    plans = plan(runs, args.epochs, data_dir, run_root, args.smoke)
    commands = {label: command for label, (command, _) in plans.items()}
    dirs = {label: run_dir for label, (_, run_dir) in plans.items()}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f'{study}: {len(runs)} runs, {args.jobs} at a time, {threads} thread(s) each', flush=True)
    tic = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(runs, pool.map(
            lambda label: train(commands[label], dirs[label], threads, args.fresh), runs)))
    minutes = (time.time() - tic) / 60
    for label, (run_minutes, error, reused) in done.items():
        if error and 'nan or inf' not in error:
            raise ValueError(f'the run "{label}" failed: {error} (see {dirs[label]}/train.out)')
        print(f'  {label}: {run_minutes:.1f} min' + ' (reused)' * reused
              + (f' ({error})' if error else ''), flush=True)

    # ------------------------------------------------------------------------- figure, table, logs
    os.makedirs(results, exist_ok=True)
    labels, run_dirs = list(runs), [dirs[label] for label in runs]
    png, md = (os.path.join(results, f'{study}.{ext}') for ext in ('png', 'md'))
    plot.plot_runs(run_dirs, labels, out=png, title=title)
    diverged = [f'- {label}: {error}' for label, (_, error, _) in done.items() if error]
    times = ', '.join(f'{label} {m:.1f}' for label, (m, _, _) in done.items())
    with open(md, 'w') as f:
        f.write(f'**The paper:** {finding}\n\n' + plot.summary_table(run_dirs, labels) + '\n\n'
                + ('\n'.join(diverged) + '\n\n' if diverged else '')
                + f'Minutes per run ({args.jobs} at a time, {threads} thread(s) each, '
                + f'{os.cpu_count()} CPU cores):'
                + f' {times}.' + (' (--smoke)' if args.smoke else '')
                + ' Commands, from the repository root:\n\n'
                + ''.join(f'    python {" ".join(commands[label][1:])}\n' for label in runs))
    if not args.smoke and not args.out:                 # the logs beside the figure: re-plottable
        for label, run_dir in zip(labels, run_dirs):
            keep = os.path.join(results, study, os.path.basename(run_dir))
            os.makedirs(keep, exist_ok=True)
            shutil.copy(os.path.join(run_dir, 'log.jsonl'), keep)
    print(f'{study}: {minutes:.1f} minutes; '
          + ('smoke test passed' if tmp else f'wrote {png} and {md}'), flush=True)
    if tmp:                                             # --smoke without --out: nothing stays
        shutil.rmtree(tmp, ignore_errors=True)


def main(study, runs, doc, title, finding):
    """run_lab with a user error as one line and exit status 1."""
    try:
        run_lab(study, runs, doc, title, finding)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)

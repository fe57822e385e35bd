"""The course labs (labs/*.py and labs/_lab.py): every lab's commands carry its study's flags, the
paired seed, the dtype, the lab's kNN images and a full schedule; seeds are paired (the same seed
gives every setting the same initial weights and first batch, another seed other ones); one lab
runs end to end in its --smoke mode with two seeds, and its table, numbers and verdicts are those
of its logs; finished runs are reused, from the runs folder or from committed results, only when
their command, seed and dtype match; LABS.md's generated blocks are rewritten from the results."""
import ast
import glob
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABS = os.path.join(ROOT, 'labs')
sys.path.insert(0, LABS)
import _lab  # noqa: E402
import stats  # noqa: E402


def defines_runs(path):
    tree = ast.parse(open(path).read())
    return any(isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', None) == 'RUNS'
               for n in tree.body)


STUDIES = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(LABS, '*.py'))
                 if defines_runs(f))
DEMO_BATCH, DEMO_IMAGES = 128, 5000           # train_pretrain.py's demo preset, data.DEMO_TRAIN


def lab(study, *argv):
    return subprocess.run([sys.executable, os.path.join(LABS, f'{study}.py'), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_run(run_dir):
    """config.json, result.json, step rows and epoch rows of a lab's run."""
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    result = json.load(open(os.path.join(run_dir, 'result.json')))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))]
    return config, result, [r for r in rows if 'step' in r], [r for r in rows if 'step' not in r]


def flag(command, name):
    return command[command.index(name) + 1]


def expected_config(flags):
    """What each flag must set in the parsed arguments (its argparse dest)."""
    want, i = {}, 0
    while i < len(flags):
        name = flags[i].lstrip('-').replace('-', '_')
        if i + 1 < len(flags) and not flags[i + 1].startswith('--'):
            want[name], i = flags[i + 1], i + 2
        elif name.startswith('no_'):
            want[name[3:]], i = False, i + 1
        else:
            want[name], i = True, i + 1
    return want


def same(value, want):
    if isinstance(want, bool):
        return value is want
    try:
        return float(value) == float(want)
    except (TypeError, ValueError):
        return value == want


def lr_at(e, warmup, epochs):
    """The lr at fractional epoch e, as a fraction of the peak: linear warm-up, then a
    half-cosine to 0 (the paper's schedule; train_pretrain.py's formula, written out here)."""
    if e < warmup:
        return e / warmup
    return 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))


# ----------------------------------------------------------------------------- every lab's plan
def test_every_study_of_the_issue_has_a_lab():
    assert set(STUDIES) == {'instability', 'position_embedding', 'class_token', 'head_bn',
                            'predictor', 'momentum', 'frameworks', 'optimizer', 'training_length'}
    assert set(_lab.STUDIES) == set(STUDIES)


@pytest.mark.parametrize('study', STUDIES)
def test_every_lab_names_its_comparisons(study):
    module = importlib.import_module(study)
    baseline = next(iter(module.RUNS))
    assert len(module.RUNS) >= 2 and module.TITLE and module.FINDING
    against = getattr(module, 'AGAINST', {})
    assert set(module.PAPER) <= set(module.RUNS) - {baseline}
    assert set(against) <= set(module.RUNS) and set(against.values()) <= set(module.RUNS)
    for gap in module.PAPER.values():       # a gap in points, or the paper's direction alone
        assert gap in ('+', '-') or isinstance(gap, float)


@pytest.mark.parametrize('study', STUDIES)
def test_every_run_carries_its_flags_seed_dtype_and_the_lab_images(study, tmp_path):
    import train_pretrain  # the parser that reads the commands (labs run it, never import it)
    runs = importlib.import_module(study).RUNS
    todo = _lab.plan(runs, 2, _lab.EPOCHS, _lab.LAB_DATA, str(tmp_path), 'bf16')
    assert [(r['seed'], r['label']) for r in todo] == [(s, label) for s in (0, 1) for label in runs]
    assert len({r['dir'] for r in todo}) == len(todo)                 # a folder per run
    for run in todo:
        args = train_pretrain.parse_args(run['command'][2:])
        flags = [f for f in runs[run['label']]]
        for key, want in expected_config(flags).items():                # the study's flags
            assert same(getattr(args, key), want), (run['label'], key)
        assert (args.seed, args.dtype, args.print_freq) == (run['seed'], 'bf16', 1)
        assert args.data == args.knn_data == _lab.LAB_DATA               # the lab's kNN images
        assert args.warmup_epochs == pytest.approx(_lab.WARMUP * args.epochs)
        assert os.path.basename(run['dir']).endswith(f'_s{run["seed"]}')
    # seed 1 of a setting is seed 0's folder but for its suffix: plot.py groups them so
    assert [r['dir'][:-1] for r in todo[:len(runs)]] == [r['dir'][:-1] for r in todo[len(runs):]]


def test_the_default_run_is_shared_between_labs(tmp_path):
    dirs = {study: {r['dir'] for r in _lab.plan(importlib.import_module(study).RUNS, 1,
                                                  _lab.EPOCHS, 'd', str(tmp_path), 'bf16')}
            for study in STUDIES}
    default = os.path.join(str(tmp_path), 'default_e2_s0')
    assert sum(default in d for d in dirs.values()) == len(STUDIES)


def test_the_instability_sweep_shares_the_labs_runs(tmp_path):
    instability = importlib.import_module('instability')

    def dirs(runs):
        return {r['dir'] for r in _lab.plan(runs, 1, _lab.EPOCHS, 'd', str(tmp_path), 'bf16')}

    # the demo's run and the learned projection at the lab's high lr are sweep runs too
    assert len(dirs(instability.SWEEP) & dirs(instability.RUNS)) == 2
    assert f'lr {instability.HIGH_LR}' in instability.SWEEP


@pytest.mark.parametrize('study', STUDIES)
def test_every_run_has_a_full_schedule(study, tmp_path):
    """Warm-up over a quarter of the run, then the half-cosine: the lr peaks before the middle
    and is ~0 at the run's last step, a 1-epoch run too (once all warm-up: its lr ended at the
    peak and never decayed)."""
    for run in _lab.plan(importlib.import_module(study).RUNS, 1, _lab.EPOCHS, 'd',
                         str(tmp_path), 'bf16'):
        command = run['command']
        epochs, warmup = int(flag(command, '--epochs')), float(flag(command, '--warmup-epochs'))
        batch = int(flag(command, '-b')) if '-b' in command else DEMO_BATCH
        iters = DEMO_IMAGES // batch                                    # drop_last
        lrs = [lr_at(epoch + i / iters, warmup, epochs)
               for epoch in range(epochs) for i in range(iters)]
        peak = lrs.index(max(lrs))
        assert max(lrs) == pytest.approx(1, abs=1 / iters)             # it reaches the peak,
        assert peak < len(lrs) / 2                                      # before the middle,
        assert lrs[-1] < 0.01                                           # and ends near 0
        if epochs == 1:             # 39 steps: the warm-up ends at step 9.75, the last is 38
            assert warmup == 0.25 and peak == 10
            assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (38 / 39 - 0.25) / 0.75)))


@pytest.mark.parametrize('study', ['momentum', 'instability', 'optimizer', 'predictor', 'head_bn',
                                   'frameworks'])
def test_a_seed_gives_every_setting_the_same_initial_weights(study):
    """What train_pretrain.main does before it builds the model, torch.manual_seed(seed), here
    for each setting of the labs whose tensors keep their shapes: every tensor two settings share
    starts equal at one seed; another seed draws other weights."""
    import torch
    import train_pretrain

    def build(flags, seed):
        args = train_pretrain.parse_args(['--preset', 'demo', 'd', '--seed', str(seed)]
                                         + flags + _lab.SMOKE)
        torch.manual_seed(args.seed)
        return train_pretrain.build_model(args).state_dict()

    runs = importlib.import_module(study).RUNS
    base = build([], 0)
    for label, flags in runs.items():
        other = build(flags, 0)
        shared = [k for k in other if k in base and other[k].shape == base[k].shape]
        backbone = {k for k in base if k.startswith('base_encoder.') and '.head.' not in k}
        assert backbone <= set(shared), label                 # what the kNN measures
        assert all(torch.equal(other[k], base[k]) for k in shared), label
    reseeded = build([], 1)
    drawn = [k for k, v in base.items() if v.dim() >= 2 and k.endswith('.weight')]  # random
    assert drawn and not any(torch.equal(reseeded[k], base[k]) for k in drawn)


def test_a_seed_gives_the_same_batch_order():
    """train_pretrain.py's loader is data.make_loader(..., seed=args.seed) with set_epoch: the
    order of a seed is the same in every setting, another seed's is another."""
    import torch
    import data
    images = torch.utils.data.TensorDataset(torch.arange(100))

    def first_batch(seed):
        loader = data.make_loader(images, 10, 0, 1, 0, train=True, pin_memory=False, seed=seed)
        loader.sampler.set_epoch(0)
        return next(iter(loader))[0].tolist()

    assert first_batch(0) == first_batch(0) != first_batch(1)


# ----------------------------------------------------------------------------- a lab end to end
@pytest.fixture(scope='module')
def momentum(tmp_path_factory):
    """The momentum lab's smoke run with 2 seeds of its 3 settings (two runs at a time: smoke
    runs are mostly start-up, which overlaps well)."""
    out = tmp_path_factory.mktemp('momentum')
    r = lab('momentum', '--smoke', '--seeds', '2', '--jobs', '2', '--out', str(out),
            '--dtype', 'fp32')                      # the same numbers on any CPU
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = importlib.import_module('momentum').RUNS
    todo = {(run['label'], run['seed']): run['dir']
            for run in _lab.plan(runs, 2, 2, 'd', os.path.join(str(out), 'runs'), 'fp32')}
    return out, r.stdout, {key: read_run(d) for key, d in todo.items()}


def test_smoke_lab_runs_each_setting_and_seed(momentum):
    out, stdout, logs = momentum
    assert stdout.count('min\n') == 6 and '(reused)' not in stdout
    for (label, seed), (config, result, steps, epochs) in logs.items():
        assert (config['seed'], config['dtype'], config['epochs']) == (seed, 'fp32', 2)
        assert config['warmup_epochs'] == 0.5 and config['depth'] == 1        # the smoke model
        assert [e['epoch'] for e in epochs] == [0, 1, 2]
        assert len(steps) == 4                              # 40 images, batch 20, every step
        # the machine the minutes were measured on
        assert result['cpu'] == _lab.cpu_model() and result['threads'] == max(
            1, os.cpu_count() // 2)
        assert result['error'] is None and result['minutes'] > 0
    assert all(r['m'] == 0 for r in logs['m 0 (no momentum)', 1][2])
    assert logs['m 0.99 (paper)', 0][2][0]['m'] == pytest.approx(0.99)


def test_smoke_runs_are_paired(momentum):
    """Step 0 has lr 0 and every setting's keys start as a copy of the queries, whatever m: at one
    seed its loss and gradients are the same in every setting only if the initial weights, the
    first batch and its crops are; at another seed they differ."""
    _, _, logs = momentum
    for seed in (0, 1):
        first = [logs[label, seed][2][0] for label in ('m 0.9 (demo)', 'm 0.99 (paper)',
                                                         'm 0 (no momentum)')]
        for key in ('loss', 'grad_first', 'grad_last'):
            # equal up to the rounding of m * theta + (1 - m) * theta (= theta) in fp32
            assert max(row[key] for row in first) == pytest.approx(
                min(row[key] for row in first), rel=1e-5), (seed, key)
    first = [logs['m 0.9 (demo)', seed][2][0]['loss'] for seed in (0, 1)]
    assert first[0] != pytest.approx(first[1], rel=1e-3)            # another seed: other data


def test_smoke_runs_follow_the_schedule_they_were_given(momentum):
    _, _, logs = momentum
    for config, _, steps, _ in logs.values():
        iters = sum(r['epoch'] == 1 for r in steps)
        peak = config['lr'] * config['batch_size'] / 256
        for r in steps:
            want = peak * lr_at(r['step'] / iters, config['warmup_epochs'], config['epochs'])
            assert r['lr'] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_smoke_table_and_verdicts_are_the_logs(momentum):
    out, _, logs = momentum
    assert (out / 'momentum.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = (out / 'momentum.md').read_text()
    numbers = json.loads((out / 'momentum.json').read_text())
    assert table.startswith('**The paper:**') and '(--smoke)' in table
    final = {key: log[3][-1]['knn_top1'] for key, log in logs.items()}
    paper = importlib.import_module('momentum').PAPER
    for label in ('m 0.9 (demo)', 'm 0.99 (paper)', 'm 0 (no momentum)'):
        values = [final[label, 0], final[label, 1]]
        row = next(ln for ln in table.splitlines() if ln.startswith(f'| {label} |'))
        assert f'| 2 | {stats.fmt_interval(values)} |' in row
    for c in numbers['comparisons']:
        diffs = [final[c['setting'], s] - final['m 0.9 (demo)', s] for s in (0, 1)]
        assert c['against'] == 'm 0.9 (demo)' and c['diffs'] == pytest.approx(diffs)
        assert (c['kind'], c['verdict']) == stats.verdict(diffs, paper[c['setting']])
        row = next(ln for ln in table.splitlines() if ln.startswith(f'| {c["setting"]} |'))
        assert f'{stats.fmt_interval(diffs, signed=True)} vs m 0.9 (demo)' in row
        assert c['verdict'] in row


def test_finished_runs_are_reused_when_command_seed_and_dtype_match(momentum, tmp_path):
    out, _, _ = momentum
    logs = sorted(glob.glob(str(out / 'runs' / '*' / 'log.jsonl')))
    before = [open(f).read() for f in logs]
    again = lab('momentum', '--smoke', '--seeds', '2', '--out', str(out), '--dtype', 'fp32')
    assert again.returncode == 0 and again.stdout.count('(reused)') == 6
    assert [open(f).read() for f in logs] == before
    # committed results (labs/results/<study>/<run>/: the log, config.json, result.json) are
    # reused on a new machine; one whose dtype differs is trained again
    ref = tmp_path / 'ref'
    for run in glob.glob(str(out / 'runs' / '*')):
        keep = ref / 'momentum' / os.path.basename(run)
        keep.mkdir(parents=True)
        for f in _lab.RUN_FILES:
            shutil.copy(os.path.join(run, f), keep)
    config = ref / 'momentum' / 'moco-m_0_e2_s1' / 'config.json'
    config.write_text(config.read_text().replace('"fp32"', '"bf16"'))
    new = tmp_path / 'new'
    r = lab('momentum', '--smoke', '--seeds', '2', '--out', str(new), '--reference', str(ref),
            '--dtype', 'fp32')
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('(committed)') == 5 and 'moco-m_0_e2_s1: ' in r.stdout
    assert sorted(os.listdir(new / 'runs' / 'default_e2_s0')) == sorted(_lab.RUN_FILES)
    assert os.path.isfile(new / 'runs' / 'moco-m_0_e2_s1' / 'train.out')   # trained anew


def test_bad_input_is_one_line(tmp_path):
    r = lab('predictor', '--smoke', '--seeds', '0', '--out', str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        'error: --jobs, --epochs and --seeds must be at least 1']


# ----------------------------------------------------------------------------- LABS.md
def test_block_is_rewritten_between_its_markers():
    text = 'a\n<!-- begin: x -->\nold\n<!-- end: x -->\nb\n'
    assert _lab.block(text, 'x', 'new\n') == 'a\n<!-- begin: x -->\nnew\n<!-- end: x -->\nb\n'
    assert _lab.block(text, 'y', 'new') == text                    # no markers: unchanged


def test_labs_md_has_a_generated_block_for_every_lab():
    text = open(_lab.LABS_MD).read()
    for name in (*STUDIES, 'instability_sweep', 'summary'):
        assert f'<!-- begin: {name} -->' in text and f'<!-- end: {name} -->' in text, name


def test_summary_is_generated_from_the_results(tmp_path):
    results = tmp_path / 'results'
    results.mkdir()
    comparison = dict(setting='no predictor', against='with predictor (default)', paper=-1.0,
                      diffs=[2.0, 2.2, 1.8], kind='opposite',
                      verdict='opposite to the paper, resolved')
    (results / 'predictor.json').write_text(json.dumps(dict(comparisons=[comparison])))
    (results / 'predictor.md').write_text('**The paper:** x\n\n| table |\n')
    (results / 'momentum.md').write_text('an old table, without its .json: not shown')
    md = tmp_path / 'LABS.md'
    md.write_text(''.join(f'<!-- begin: {n} -->\nold\n<!-- end: {n} -->\n'
                          for n in ('predictor', 'momentum', 'summary')))
    _lab.write_labs_md(str(results), str(md))
    text = md.read_text()
    assert '<!-- begin: momentum -->\n*Not run yet at this scale:* `python labs/momentum.py ' \
           '--seeds 5` writes it here.\n<!-- end: momentum -->' in text
    assert '| predictor | no predictor − with predictor (default) | -1.0 | +2.0 ± 0.5 | 3 | ' \
           'opposite to the paper, resolved |' in text
    assert '| momentum | m 0.99 (paper) − m 0.9 (demo) | +0.9 | not run yet | 0 | ' \
           '`python labs/momentum.py --seeds 5` |' in text
    assert '**The paper:** x' in text and 'predictor.png)' in text and 'old' not in text


def test_inspect_draws_each_settings_seed0_features(tmp_path):
    r = lab('predictor', '--smoke', '--seeds', '1', '--out', str(tmp_path), '--dtype', 'fp32',
            '--inspect')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = sorted(os.listdir(tmp_path / 'runs'))
    looks = sorted(os.listdir(tmp_path / 'predictor_look'))
    assert looks == runs and len(runs) == 2
    for run in runs:
        drawn = sorted(os.listdir(tmp_path / 'predictor_look' / run))
        assert drawn == ['attention.png', 'feature_space.png', 'neighbours.png', 'patch_pca.png']

"""The course labs (labs/*.py): each runs end to end in its --smoke mode (a 1-block ViT on 40
images), every run gets the flags of its study, the logs show what the study varies, and the lab
writes its figure and its table."""
import ast
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABS = os.path.join(ROOT, 'labs')
sys.path.insert(0, LABS)
import _lab  # noqa: E402

STUDIES = sorted(f[:-3] for f in os.listdir(LABS)
                 if f.endswith('.py') and not f.startswith('_') and f != 'plot.py')


def runs_of(study):
    """The lab's RUNS, read from its source (label -> flags)."""
    tree = ast.parse(open(os.path.join(LABS, f'{study}.py')).read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 'RUNS')
    return ast.literal_eval(node.value)


def lab(study, *argv):
    return subprocess.run([sys.executable, os.path.join(LABS, f'{study}.py'), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_run(run_dir):
    """config.json, step rows and epoch rows of a train_pretrain.py run."""
    config = json.load(open(os.path.join(run_dir, 'config.json')))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))]
    return config, [r for r in rows if 'step' in r], [r for r in rows if 'step' not in r]


def expected_config(flags):
    """What each flag must have set in the run's config.json (its argparse dest)."""
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


def test_every_study_of_the_issue_has_a_lab():
    assert set(STUDIES) == {'instability', 'position_embedding', 'class_token', 'head_bn',
                            'predictor', 'momentum', 'frameworks', 'optimizer', 'training_length'}


@pytest.mark.parametrize('study', STUDIES)
def test_lab_smoke_runs_each_setting_and_writes_figure_and_table(study, tmp_path):
    # two runs at a time: smoke runs are mostly start-up, which overlaps well
    r = lab(study, '--smoke', '--jobs', '2', '--out', str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    png, md = tmp_path / f'{study}.png', tmp_path / f'{study}.md'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    table = md.read_text()
    assert table.startswith('**The paper:**') and '--smoke' in table
    runs = runs_of(study)
    assert len(runs) >= 2
    logs = {}
    for label, flags in runs.items():
        assert f'| {label} |' in table                       # one row per run
        own, epochs = list(flags), 2                          # --smoke: 2 epochs, or the run's
        if '--epochs' in own:
            i = own.index('--epochs')
            epochs = int(own[i + 1])
            del own[i:i + 2]
        run_dir = tmp_path / 'runs' / _lab.run_name(own, epochs)
        config, steps, epoch_rows = logs[label] = read_run(run_dir)
        for key, want in expected_config(flags).items():  # the study's flags reached the run
            assert same(config[key], want), (label, key, config[key], want)
        assert config['epochs'] == epochs and config['depth'] == 1     # the smoke model
        assert [e['epoch'] for e in epoch_rows] == list(range(epochs + 1))
        assert all(e['knn_top1'] is not None for e in epoch_rows)
        assert len(steps) == 2 * epochs                       # 40 images, batch 20, every step
    # what each study varies shows in the logs
    if study == 'momentum':
        assert all(r['m'] == 0 for r in logs['m 0 (no momentum)'][1])
        assert logs['m 0.99 (paper)'][1][0]['m'] == pytest.approx(0.99)
        assert logs['m 0.9 (demo)'][1][0]['m'] == pytest.approx(0.9)
    if study == 'instability':
        frozen = logs['lr 2e-2, frozen random projection'][1]
        assert all(r['grad_first'] is None for r in frozen)
        assert all(r['grad_first'] > 0 for r in logs['lr 2e-2, learned projection'][1])
    if study == 'training_length':                            # each run its own full schedule
        assert all(steps[-1]['lr'] < steps[len(steps) // 2]['lr']
                   for _, steps, _ in logs.values() if len(steps) > 2)


def test_a_run_finished_with_the_same_command_is_reused(tmp_path):
    assert lab('predictor', '--smoke', '--out', str(tmp_path)).returncode == 0
    log = tmp_path / 'runs' / 'default_e2' / 'log.jsonl'
    before = log.read_text()
    again = lab('predictor', '--smoke', '--out', str(tmp_path))
    assert again.returncode == 0 and again.stdout.count('(reused)') == len(runs_of('predictor'))
    assert log.read_text() == before
    fresh = lab('predictor', '--smoke', '--out', str(tmp_path), '--fresh')
    assert fresh.returncode == 0 and '(reused)' not in fresh.stdout


def test_bad_input_is_one_line(tmp_path):
    r = lab('predictor', '--smoke', '--jobs', '0', '--out', str(tmp_path))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        'error: --jobs and --epochs must be at least 1']
    assert 'Traceback' not in r.stderr

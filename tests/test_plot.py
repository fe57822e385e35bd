"""labs/plot.py on two hand-written logs (no training): the rows it reads, what each panel draws,
the summary table's numbers computed by hand, and the CLI's output and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'labs'))
import plot  # noqa: E402  (first: it picks the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

PNG = b'\x89PNG\r\n\x1a\n'


def step(e, s, loss, first, last, **extra):
    return dict(epoch=e, step=s, loss=loss, lr=1e-4 * (s + 1), m=0.99 + 0.001 * s, img_s=30.0,
                grad_first=first, grad_last=last, **extra)


# Run A: 2 epochs of 5 iterations logged every 2 steps (and each epoch's last), a spike at step 7.
# grad_first = 1, 2, 3, 4, 50, 2: max 50, median (2 + 3) / 2 = 2.5 -> ratio 20.0
RUN_A = [dict(epoch=0, loss_avg=None, knn_top1=10.0),
         step(1, 0, 4.0, 1.0, 0.5), step(1, 2, 3.8, 2.0, 0.6), step(1, 4, 3.6, 3.0, 0.7),
         dict(epoch=1, loss_avg=3.8, knn_top1=20.0),
         step(2, 5, 3.5, 4.0, 0.8), step(2, 7, 3.9, 50.0, 0.9, spike='grad_first'),
         step(2, 9, 3.2, 2.0, 0.7),
         dict(epoch=2, loss_avg=3.45, knn_top1=18.5)]
# Run B: the patch projection frozen (grad_first null), 1 epoch of 5 iterations.
RUN_B = [dict(epoch=0, loss_avg=None, knn_top1=12.0),
         step(1, 0, 4.1, None, 0.4), step(1, 2, 3.9, None, 0.5), step(1, 4, 3.7, None, 0.6),
         dict(epoch=1, loss_avg=3.9, knn_top1=14.0)]


def write_run(path, rows, garbage=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'log.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
        if garbage is not None:
            f.write(garbage)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / 'spiky', RUN_A), write_run(tmp_path / 'frozen', RUN_B)


def test_read_log(runs):
    steps, epochs = plot.read_log(runs[0])
    assert [r['step'] for r in steps] == [0, 2, 4, 5, 7, 9]
    assert [r['epoch'] for r in epochs] == [0, 1, 2]
    assert steps[4]['spike'] == 'grad_first' and epochs[0]['loss_avg'] is None


@pytest.mark.parametrize('case', ['no dir', 'no log', 'empty', 'garbage', 'not an object'])
def test_read_log_errors(tmp_path, case):
    d = tmp_path / 'run'
    if case != 'no dir':
        d.mkdir()
    if case == 'empty':
        write_run(d, [], garbage='\n')
    if case in ('garbage', 'not an object'):
        write_run(d, RUN_B, garbage='{"epoch": 1, "lo' if case == 'garbage' else '[1, 2]\n')
    with pytest.raises(ValueError, match=str(d)) as e:
        plot.read_log(str(d))
    assert '\n' not in str(e.value)
    if case in ('garbage', 'not an object'):
        assert 'line 6' in str(e.value)


def test_plot_runs(runs, tmp_path):
    out = tmp_path / 'cmp.png'
    fig = plot.plot_runs(runs, labels=['A', 'B'], out=str(out), title='two runs')
    assert out.read_bytes()[:8] == PNG
    ax_loss, ax_knn, ax_lr, ax_grad, ax_m = fig.axes        # the 2x2 panels, then lr's twin
    assert ax_m.bbox.bounds == ax_lr.bbox.bounds
    for ax in (ax_loss, ax_knn, ax_lr, ax_m):                # one curve per run
        assert len(ax.lines) == 2
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes[:4])
    assert ax_m.get_ylabel() and fig._suptitle.get_text() == 'two runs'
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ['A', 'B']
    # the values drawn are those of the log; kNN includes epoch 0, the random init
    assert list(ax_loss.lines[0].get_ydata()) == [4.0, 3.8, 3.6, 3.5, 3.9, 3.2]
    assert list(ax_knn.lines[1].get_xdata()) == [0, 1] and ax_knn.lines[1].get_marker() == 'o'
    assert ax_lr.lines[0].get_linestyle() == '-' and ax_m.lines[0].get_linestyle() == '--'
    # gradients: A's first layer and last block, B's last block only; log scale; one spike
    assert ax_grad.get_yscale() == 'log'
    assert [ln.get_linestyle() for ln in ax_grad.lines] == ['-', '--', '--']
    assert [ln.get_color() for ln in ax_grad.lines] == ['C0', 'C0', 'C1']
    (spike,) = ax_grad.collections
    assert spike.get_offsets().tolist() == [[7.0, 50.0]]
    legend = [t.get_text() for t in ax_grad.get_legend().get_texts()]    # colour = run, as (a)
    assert legend == ['first layer', 'last block', 'spike (10x median)', 'B: first layer (frozen)']
    assert not any(t.get_text() == 'no data' for ax in fig.axes for t in ax.texts)
    plt.close(fig)


def test_plot_no_data(tmp_path):
    run = write_run(tmp_path / 'init_only', [dict(epoch=0, loss_avg=None, knn_top1=None)])
    fig = plot.plot_runs([run])
    for ax in fig.axes[:4]:
        assert not ax.lines and [t.get_text() for t in ax.texts] == ['no data']
    plt.close(fig)


def test_summary_table(runs):
    lines = plot.summary_table(runs, labels=['A', 'B']).splitlines()
    assert len(lines) == 4 and lines[1] == '|---|---|---|---|---|---|---|'
    assert 'final kNN top-1 (%)' in lines[0] and 'steps' in lines[0]
    cells = [[c.strip() for c in ln.strip('|').split('|')] for ln in lines[2:]]
    assert cells[0] == ['A', '18.5', '20.0', '10.0', '3.4500', '20.0', '10']
    assert cells[1] == ['B', '14.0', '14.0', '12.0', '3.9000', '—', '5']
    default = plot.summary_table(runs).splitlines()
    assert default[2].startswith('| spiky |') and default[3].startswith('| frozen |')


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'labs', 'plot.py'), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli(runs, tmp_path):
    r = cli(*runs, '--table')                                # default: beside the first run
    assert r.returncode == 0, r.stderr
    out = os.path.join(runs[0], 'plot.png')
    assert r.stdout.splitlines()[0] == out
    with open(out, 'rb') as f:
        assert f.read(8) == PNG
    assert '| spiky | 18.5 | 20.0 | 10.0 | 3.4500 | 20.0 | 10 |' in r.stdout
    out = str(tmp_path / 'x.png')
    r = cli(*runs, '--labels', 'A', 'B', '-o', out, '--title', 'T')
    assert r.returncode == 0 and r.stdout == out + '\n' and os.path.isfile(out)


@pytest.mark.parametrize('case', ['missing dir', 'label count', 'garbage line'])
def test_cli_errors(runs, tmp_path, case):
    args = {'missing dir': [runs[0], str(tmp_path / 'nowhere')],
            'label count': [*runs, '--labels', 'only-one'],
            'garbage line': [write_run(tmp_path / 'bad', RUN_A, garbage='not json\n')]}[case]
    r = cli(*args)
    assert r.returncode == 1 and r.stdout == ''
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith('error: ')
    assert 'Traceback' not in r.stderr
    assert {'missing dir': 'nowhere', 'label count': '1 labels for 2',
            'garbage line': 'line 10'}[case] in r.stderr

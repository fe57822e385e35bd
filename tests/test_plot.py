"""labs/plot.py on hand-written logs (no training): the rows it reads (a live run's too), each
run's numbers, what each panel draws (means, bands and seed lines computed by hand, schedules
drawn once where they coincide, spikes where the log says, the frozen layer named as such), a
legend that covers no panel, the summary table, and the CLI's output and one-line errors."""
import json
import math
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


def step(e, s, loss, first, last, lr=None, **extra):
    lr = 1e-4 * (s + 1) if lr is None else lr
    return dict(epoch=e, step=s, loss=loss, lr=lr, m=0.99 + 0.001 * s, img_s=30.0,
                grad_first=first, grad_last=last, grad_first_max=first, grad_last_max=last,
                **extra)


# Run A: 2 epochs of 5 iterations logged every 2 steps (and each epoch's last), a first-layer
# spike at step 7 (the monitor's ratio 25 to the running median), none in the last block.
RUN_A = [dict(epoch=0, loss_avg=None, knn_top1=10.0),
         step(1, 0, 4.0, 1.0, 0.5), step(1, 2, 3.8, 2.0, 0.6), step(1, 4, 3.6, 3.0, 0.7),
         dict(epoch=1, loss_avg=3.8, knn_top1=20.0),
         step(2, 5, 3.5, 4.0, 0.8), step(2, 7, 3.9, 50.0, 0.9, spike='grad_first',
                                          spike_ratio=25.0, spike_step=7),
         step(2, 9, 3.2, 2.0, 0.7),
         dict(epoch=2, loss_avg=3.45, knn_top1=18.5)]
# Run B: the patch projection frozen (grad_first null), 1 epoch of 5 iterations.
RUN_B = [dict(epoch=0, loss_avg=None, knn_top1=12.0),
         step(1, 0, 4.1, None, 0.4), step(1, 2, 3.9, None, 0.5), step(1, 4, 3.7, None, 0.6),
         dict(epoch=1, loss_avg=3.9, knn_top1=14.0)]


def shifted(rows, knn=0.0, loss=0.0):
    """Another seed of the same setting: the same steps, other numbers."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get('knn_top1') is not None:
            r['knn_top1'] += knn
        for k in ('loss', 'loss_avg'):
            if r.get(k) is not None:
                r[k] += loss
        out.append(r)
    return out


def write_run(path, rows, garbage=None, config=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'log.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
        if garbage is not None:
            f.write(garbage)
    if config is not None:
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump(config, f)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / 'spiky', RUN_A), write_run(tmp_path / 'frozen', RUN_B)


@pytest.fixture
def seeds(tmp_path):
    """Setting a_e2 with seeds 0 and 1 (kNN 2 points apart, loss 0.2), setting b_e2 with seed 0."""
    return [write_run(tmp_path / 'a_e2_s0', RUN_A), write_run(tmp_path / 'a_e2_s1',
                                                              shifted(RUN_A, 2.0, 0.2)),
            write_run(tmp_path / 'b_e2_s0', shifted(RUN_A, -4.0))]


def test_read_log(runs):
    steps, epochs = plot.read_log(runs[0])
    assert [r['step'] for r in steps] == [0, 2, 4, 5, 7, 9]
    assert [r['epoch'] for r in epochs] == [0, 1, 2]
    assert steps[4]['spike'] == 'grad_first' and epochs[0]['loss_avg'] is None


def test_read_log_of_a_live_run(tmp_path):
    # the row being written has no newline yet: the rows before it are the run so far
    run = write_run(tmp_path / 'live', RUN_A[:3], garbage='{"epoch": 1, "step": 4, "lo')
    steps, epochs = plot.read_log(run)
    assert [r['step'] for r in steps] == [0, 2] and len(epochs) == 1


@pytest.mark.parametrize('case', ['no dir', 'no log', 'empty', 'garbage', 'not an object'])
def test_read_log_errors(tmp_path, case):
    d = tmp_path / 'run'
    if case != 'no dir':
        d.mkdir()
    if case == 'empty':
        write_run(d, [], garbage='\n')
    if case in ('garbage', 'not an object'):
        write_run(d, RUN_B, garbage='{"epoch": 1, "lo\n' if case == 'garbage' else '[1, 2]\n')
    with pytest.raises(ValueError, match=str(d)) as e:
        plot.read_log(str(d))
    assert '\n' not in str(e.value)
    if case in ('garbage', 'not an object'):
        assert 'line 6' in str(e.value)


def test_run_numbers(runs, tmp_path):
    a = plot.run_numbers(runs[0])
    assert (a['final'], a['init'], a['best'], a['loss'], a['steps'], a['epochs']) == \
        (18.5, 10.0, 20.0, 3.45, 10, 2)
    assert a['spikes'] == {'grad_first': 1, 'grad_last': 0} and a['spike_ratio'] == 25.0
    assert not a['frozen'] and a['seed'] == 0
    b = plot.run_numbers(runs[1])
    assert b['frozen'] and b['spike_ratio'] is None and b['spikes'] == dict.fromkeys(plot.LAYERS, 0)
    # the seed: config.json's, else the folder's suffix
    assert plot.run_numbers(write_run(tmp_path / 'x_e2_s3', RUN_B))['seed'] == 3
    configured = write_run(tmp_path / 'x_e2_s4', RUN_B, config=dict(seed=7))
    assert plot.run_numbers(configured)['seed'] == 7
    # a run stopped before its first epoch has no final kNN (the random init is not one)
    assert plot.run_numbers(write_run(tmp_path / 'young', RUN_A[:3]))['final'] is None


def polygon_at(collection, x):
    """The (low, high) of a fill_between band at x."""
    ys = [y for px, y in collection.get_paths()[0].vertices if px == x]
    return min(ys), max(ys)


def test_bands_and_seed_lines(seeds):
    fig = plot.plot_runs(seeds, paper='b_e2: paper -1.0, here -4.0')
    ax_loss, ax_knn, ax_lr, ax_grad, ax_m = fig.axes          # the 2x2 panels, then lr's twin
    assert ax_m.bbox.bounds == ax_lr.bbox.bounds
    # (b): setting a_e2's two seeds thin, its mean thick; b_e2's one seed alone; random init
    thin = [ln for ln in ax_knn.lines if ln.get_linewidth() < 1]
    assert [list(ln.get_ydata()) for ln in thin] == [[10.0, 20.0, 18.5], [12.0, 22.0, 20.5]]
    mean_a, mean_b, init = [ln for ln in ax_knn.lines if ln.get_linewidth() >= 1]
    assert list(mean_a.get_ydata()) == [11.0, 21.0, 19.5] and mean_a.get_color() == 'C0'
    assert list(mean_b.get_ydata()) == [6.0, 16.0, 14.5] and mean_b.get_color() == 'C1'
    assert list(init.get_ydata()) == [11.0, 11.0]             # setting a's epoch 0, both seeds
    # the band: the 95% t-interval of the mean of 2 seeds 2 points apart: +- 12.706 x sd / sqrt 2
    (band,) = ax_knn.collections                              # one band: b_e2 has one seed
    assert polygon_at(band, 2) == pytest.approx((19.5 - 12.706, 19.5 + 12.706))
    assert 'paper -1.0, here -4.0' in ax_knn.get_title()
    # (a): the mean loss over the seeds of a setting
    assert ax_loss.lines[0].get_ydata()[0] == pytest.approx(4.1)
    plt.close(fig)


def test_schedules_drawn_once_where_they_coincide(tmp_path):
    same = [write_run(tmp_path / 'p_e2_s0', RUN_A), write_run(tmp_path / 'q_e2_s0', RUN_A)]
    fig = plot.plot_runs(same)
    ax_lr, ax_m = fig.axes[2], fig.axes[4]
    assert len(ax_lr.lines) == len(ax_m.lines) == 1 and ax_lr.lines[0].get_color() == 'k'
    assert 'lr: the same for every setting\nm: the same for every setting' in ax_lr.get_title()
    plt.close(fig)
    other = [dict(r, lr=2 * r['lr']) if 'step' in r else r for r in RUN_A]
    fig = plot.plot_runs([*same, write_run(tmp_path / 'r_e2_s0', other)])
    ax_lr, ax_m = fig.axes[2], fig.axes[4]
    # lr: p and q share a curve, drawn once in p's colour; r's is its own
    assert [ln.get_color() for ln in ax_lr.lines] == ['C0', 'C2']
    assert [list(ln.get_ydata()) for ln in ax_lr.lines] == [
        [r['lr'] for r in RUN_A if 'step' in r], [r['lr'] for r in other if 'step' in r]]
    assert len(ax_m.lines) == 1 and ax_m.lines[0].get_color() == 'k'   # m: one for all
    assert ax_lr.get_title().endswith('\nlr: 2 curves for 3 settings (drawn once each)'
                                      '\nm: the same for every setting')
    plt.close(fig)


def test_gradients_spikes_and_the_frozen_layer(runs, tmp_path):
    out = tmp_path / 'cmp.png'
    fig = plot.plot_runs(runs, labels=['A', 'B'], out=str(out), title='two runs')
    assert out.read_bytes()[:8] == PNG and fig._suptitle.get_text() == 'two runs'
    ax_grad = fig.axes[3]
    assert ax_grad.get_yscale() == 'log'
    # A's first layer (solid) and last block (dashed); B's last block only
    assert [(ln.get_linestyle(), ln.get_color()) for ln in ax_grad.lines] == \
        [('-', 'C0'), ('--', 'C0'), ('--', 'C1')]
    (spike,) = ax_grad.collections                            # at the step the monitor named
    assert spike.get_offsets().tolist() == [[7.0, 50.0]]
    legend = {t.get_text(): h for t, h in zip(fig.legends[0].get_texts(),
                                              fig.legends[0].legend_handles)}
    # the frozen run's entry is no line: its dashed line is its last block, as for every run
    frozen = legend['B: first layer frozen, no gradient']
    assert frozen.get_linestyle() == 'None' and frozen.get_color() == 'C1'
    assert {'A', 'B', '(d) first layer', '(d) last block',
            '(d) spike: 10x its running median'} <= set(legend)
    assert not any(t.get_text() == 'no data' for ax in fig.axes for t in ax.texts)
    plt.close(fig)


def test_the_legend_covers_no_panel(runs, seeds):
    # the old legend sat on panel (d) and hid its 10^1 tick label: now it is below the panels
    for run_dirs in (runs, seeds, [*runs, *seeds]):
        fig = plot.plot_runs(run_dirs, title='t', paper='a\nb')
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.legends[0].get_window_extent(renderer)
        for ax in fig.axes:                                  # the axes with their tick labels
            assert not box.overlaps(ax.get_tightbbox(renderer)), ax.get_title()
        assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= fig.bbox.width
        plt.close(fig)


def test_against_draws_a_run_in_black(seeds, tmp_path):
    live = write_run(tmp_path / 'mine', RUN_A[:5])            # stopped after epoch 1
    fig = plot.plot_runs(seeds, against=[live])
    ax_knn = fig.axes[1]
    black = [ln for ln in ax_knn.lines if ln.get_color() == 'k']
    assert [list(ln.get_ydata()) for ln in black] == [[10.0, 20.0]]
    assert 'mine (--against)' in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)


def test_plot_no_data(tmp_path):
    run = write_run(tmp_path / 'init_only', [dict(epoch=0, loss_avg=None, knn_top1=None)])
    fig = plot.plot_runs([run])
    for ax in fig.axes[:4]:
        assert [t.get_text() for t in ax.texts] == ['no data']
    plt.close(fig)


def test_summary_table(runs, seeds):
    lines = plot.summary_table(runs, labels=['A', 'B']).splitlines()
    assert len(lines) == 4 and lines[1] == '|---|---|---|---|---|---|---|---|'
    cells = [[c.strip() for c in ln.strip('|').split('|')] for ln in lines[2:]]
    assert cells[0] == ['A', '0', '18.5', '10.0', '3.4500', '1 / 0 of 1', '25.0', '10']
    assert cells[1] == ['B', '0', '14.0', '12.0', '3.9000', '0 / 0 of 1', '—', '5']
    # seeds of one setting: mean +- 12.706 x sd / sqrt(2), sd = 2 / sqrt(2) for 18.5 and 20.5
    lines = plot.summary_table(seeds).splitlines()
    cells = [c.strip() for c in lines[2].strip('|').split('|')]
    half = 12.706 * math.sqrt(2) / math.sqrt(2)
    assert cells[:5] == ['a_e2', '0, 1', f'19.5 ± {half:.1f}', f'11.0 ± {half:.1f}', '3.5500']
    assert cells[5] == '2 / 0 of 2' and lines[3].startswith('| b_e2 | 0 | 14.5 |')


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'labs', 'plot.py'), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli(seeds, tmp_path):
    r = cli(*seeds, '--table', '--against', seeds[2])         # default: beside the first run
    assert r.returncode == 0, r.stderr
    out = os.path.join(seeds[0], 'plot.png')
    assert r.stdout.splitlines()[0] == out
    with open(out, 'rb') as f:
        assert f.read(8) == PNG
    assert '| b_e2 | 0 | 14.5 | 6.0 | 3.4500 | 1 / 0 of 1 | 25.0 | 10 |' in r.stdout
    out = str(tmp_path / 'x.png')
    r = cli(*seeds, '--labels', 'A', 'A', 'B', '-o', out, '--title', 'T')
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

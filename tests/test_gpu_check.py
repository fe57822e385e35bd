"""tools/gpu_check.sh without a GPU (CI has none): its --dry-run lists every part of the check,
and each of its commands parses with the parser of the script it runs, so a renamed flag fails here
instead of on a lent GPU; the two-process runs on one GPU and the budget of the --compile row; the
device and backend launch.setup() gives those processes. Without a usable torch or CUDA the real
run refuses in one line that names the cause."""
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import launch  # noqa: E402
import moco  # noqa: E402

CHECK = os.path.join(ROOT, 'tools', 'gpu_check.sh')
TORCHRUN = ['-m', 'torch.distributed.run', '--standalone']


def parse(line):
    """'timeout S [env MOCO_DIST_BACKEND=gloo] PY [-m torch.distributed.run --standalone
    --nproc_per_node=N] X.py ARGS' -> SimpleNamespace(limit=S, backend (None: the default),
    processes (0: no torchrun), script='X', args=ARGS parsed by X.get_args_parser())."""
    tokens = shlex.split(line)
    assert tokens[0] == 'timeout' and tokens[1].isdigit(), f'not bounded by timeout: {line}'
    cmd = SimpleNamespace(limit=int(tokens[1]), backend=None, processes=0)
    rest = tokens[2:]
    if rest[0] == 'env':
        assert rest[1] == 'MOCO_DIST_BACKEND=gloo', line
        cmd.backend, rest = 'gloo', rest[2:]
    assert rest[0] in ('python', 'python3'), line
    if rest[1:4] == TORCHRUN:
        nproc = re.fullmatch(r'--nproc_per_node=(\d+)', rest[4])
        assert nproc, line
        cmd.processes, rest = int(nproc.group(1)), rest[5:]
    else:
        rest = rest[1:]
    assert rest[0].endswith('.py') and cmd.backend in (None, 'gloo'), line
    cmd.script = os.path.basename(rest[0])[:-3]
    parser = importlib.import_module(cmd.script).get_args_parser()
    parser.allow_abbrev = False                    # full names: `--grad-ckp` is no `--grad-ckpt`
    err, cmd.args = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(err):
            cmd.args = parser.parse_args(rest[1:])
    except SystemExit:  # argparse's exit: a flag of the check no longer exists
        pass
    if cmd.args is None:
        pytest.fail(f'{cmd.script}.py rejects a command of gpu_check.sh:\n{line}\n{err.getvalue()}',
                    pytrace=False)
    return cmd


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('gpu_check'))
    r = subprocess.run(['bash', CHECK, '--dry-run', out], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert not os.listdir(out), 'a dry run writes nothing'
    lines = r.stdout.strip().splitlines()
    return out, lines, [parse(line) for line in lines]


def test_every_command_parses_and_writes_under_outdir(dry_run):
    out, lines, cmds = dry_run
    assert len(cmds) >= 15
    for cmd, line in zip(cmds, lines):
        if cmd.script != 'bench':
            assert cmd.args.output_dir.startswith(out + os.sep), line
        if getattr(cmd.args, 'arch', None) is not None:
            assert cmd.args.arch in moco.ARCHS, line


def test_pretraining_resume_and_evaluation(dry_run):
    _, lines, cmds = dry_run
    pre = [(i, c) for i, c in enumerate(cmds) if c.script == 'train_pretrain']
    assert all(c.processes >= 1 for _, c in pre)                  # torchrun: DDP, SyncBN
    runs = [(i, c) for i, c in pre if not c.args.resume]
    for _, c in runs:
        # the built-in data; the loss can fall
        assert c.args.preset == 'demo' and c.args.epochs >= 2
    # the first run, one process, builds the demo data before two processes read it
    assert runs[0][0] == 0 and runs[0][1].processes == 1
    # the arch given, else the demo preset's ViT (the raw parser's default arch is no guide:
    # the preset and the recipes become defaults only in the script's own parse)
    archs = [shlex.split(lines[i]) for i, _ in runs]
    archs = ['resnet' if '--arch' in t and t[t.index('--arch') + 1].startswith('resnet') else 'vit'
             for t in archs]
    kinds = {(arch, c.args.dtype, c.processes, c.backend) for arch, (_, c) in zip(archs, runs)}
    # fp16 (GradScaler) on both backbones; DDP, SyncBN and the gathered keys with two processes
    # on the one GPU over gloo (NCCL refuses two processes on one device); NCCL for one
    assert kinds >= {('vit', 'fp16', 1, None), ('vit', 'bf16', 2, 'gloo'),
                     ('resnet', 'fp16', 2, 'gloo')}
    resumes = [(i, c) for i, c in pre if c.args.resume == 'auto']
    assert len(resumes) == 1
    r_i, r = resumes[0]
    first = [(i, c) for i, c in runs if c.args.output_dir == r.args.output_dir]
    # more epochs, same dir, after it, as many processes
    assert first and first[0][0] < r_i and r.args.epochs > first[0][1].args.epochs
    assert (r.processes, r.backend) == (first[0][1].processes, first[0][1].backend) == (2, 'gloo')
    ckpt = os.path.join(r.args.output_dir, 'checkpoint_last.pth')
    for script in ('train_linear', 'train_finetune'):
        evals = [(i, c) for i, c in enumerate(cmds) if c.script == script]
        assert len(evals) == 1
        i, c = evals[0]
        assert (c.processes, c.backend) == (2, 'gloo')   # gathered features, all-reduced sums
        assert i > r_i and c.args.pretrained == ckpt and c.args.data == 'data/moco_demo'
        assert c.args.epochs <= 3


def test_bench_rows(dry_run):
    rows = [c.args for c in dry_run[2] if c.script == 'bench']
    assert all(c.processes == 0 for c in dry_run[2] if c.script == 'bench')
    assert all(a.dtype == 'bf16' and a.device == 'cuda' and a.json for a in rows)
    assert {a.compile for a in rows if a.arch == 'vit_base'} == {False, True}
    assert any(a.arch == 'resnet50' and a.channels_last for a in rows)
    for ckpt in (False, True):  # increasing batches, up to the first OOM
        batches = [a.batch_size for a in rows if a.arch == 'vit_small' and a.grad_ckpt == ckpt]
        # 512 = 4096 / 8 GPUs
        assert batches == sorted(batches) and len(batches) >= 3 and 512 in batches


def test_the_compile_row_has_its_time_within_the_budget(dry_run):
    """Whatever the steps before it take (at most their limits), the --compile row still has its
    ~200 s, and the whole check its 450 s (~7.5 min on one H100, a rerun within 15 minutes)."""
    budget = int(re.search(r'^BUDGET=(\d+)', open(CHECK).read(), re.M).group(1))
    cmds = dry_run[2]
    i = next(i for i, c in enumerate(cmds) if c.script == 'bench' and c.args.compile)
    assert budget <= 450 and cmds[i].limit >= 200
    assert sum(c.limit for c in cmds[:i + 1]) <= budget


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA: the check would run')
def test_refuses_without_cuda_in_one_line(tmp_path):
    out = tmp_path / 'out'
    r = subprocess.run(['bash', CHECK, str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).strip().splitlines() == [
        f'gpu_check: no CUDA GPU here: torch {torch.__version__} (CUDA {torch.version.cuda}) '
        'finds none (torch.cuda.is_available() is False); see --dry-run']
    assert not out.exists()


def test_a_torch_that_does_not_import_is_named_in_one_line(tmp_path):
    """Not "no CUDA GPU": the import error's own last line (here a torch whose CUDA library is
    missing, put first on the path)."""
    fake = tmp_path / 'torch'
    fake.mkdir()
    (fake / '__init__.py').write_text(
        "raise ImportError('libcudnn.so.9: cannot open shared object file: No such file')\n")
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run(['bash', CHECK, str(out)], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode != 0 and not out.exists()
    line, = (r.stdout + r.stderr).strip().splitlines()
    assert line.startswith('gpu_check: ') and line.endswith(
        'cannot import torch: ImportError: libcudnn.so.9: cannot open shared object file: No such '
        'file'), line


@pytest.mark.parametrize('override, gpus, local_rank, device, backend', [
    ('gloo', 1, 1, torch.device('cuda', 0), 'gloo'),   # gpu_check: two processes, one GPU
    (None, 2, 1, torch.device('cuda', 1), 'nccl'),     # torchrun on a machine of 2 GPUs
    (None, 0, 1, torch.device('cpu'), 'gloo'),         # torchrun on a CPU
])
def test_setup_gives_two_processes_one_gpu_over_the_backend_asked(monkeypatch, override, gpus,
                                                                 local_rank, device, backend):
    calls = []
    monkeypatch.setenv('RANK', str(local_rank))
    monkeypatch.setenv('LOCAL_RANK', str(local_rank))
    monkeypatch.setenv('WORLD_SIZE', '2')
    if override:
        monkeypatch.setenv('MOCO_DIST_BACKEND', override)
    else:
        monkeypatch.delenv('MOCO_DIST_BACKEND', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('set_device', d)))
    monkeypatch.setattr(launch.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(launch.dist, 'init_process_group',
                        lambda *a, **kw: calls.append(('init', a, kw)))
    monkeypatch.setattr(launch.dist, 'get_rank', lambda: local_rank)
    monkeypatch.setattr(launch.dist, 'get_world_size', lambda: 2)
    run = launch.setup()
    assert (run.rank, run.world_size, run.local_rank, run.device) == (1, 2, 1, device)
    inits = [c for c in calls if c[0] == 'init']
    assert len(inits) == 1 and [*inits[0][1], *inits[0][2].values()] == [backend]
    assert [c[1] for c in calls if c[0] == 'set_device'] == ([device] if gpus else [])


def summarise(out, resume_says):
    """Runs the check's part 3 (its Python heredoc) on the files the steps would leave: a
    two-process ViT run whose loss fell, its resumption (saying `resume_says`), one bench row."""
    script = open(CHECK).read()
    summary = script[script.index("<< 'EOF'\n") + 9:script.index('\nEOF\n')]
    two = ('env MOCO_DIST_BACKEND=gloo python3 -m torch.distributed.run --standalone '
           '--nproc_per_node=2')
    rows = [dict(epoch=e, step=s, loss=4.0 - e - s / 10) for e in (1, 2) for s in (0, 5)]
    os.makedirs(out / 'pretrain_vit_bf16')
    with open(out / 'resume_vit_bf16.before.jsonl', 'w') as f:
        f.writelines(f'{json.dumps(r)}\n' for r in rows)
    with open(out / 'pretrain_vit_bf16' / 'log.jsonl', 'w') as f:
        f.writelines(f'{json.dumps(r)}\n' for r in rows + [dict(epoch=3, step=0, loss=1.5)])
    (out / 'resume_vit_bf16.log').write_text(f'global batch 128\n{resume_says}\n')
    import bench
    row = bench.main(bench.get_args_parser().parse_args(
        ['--arch', 'vit_small', '--kw', 'depth=1', '--kw', 'embed_dim=32', '--kw', 'num_heads=2',
         '--img-size', '32', '--patch-size', '16', '-b', '2', '--moco-mlp-dim', '64',
         '--moco-dim', '16', '--device', 'cpu', '--steps', '1', '--warmup', '1',
         '--peak-n', '128', '--threads', '1', '--json']))
    (out / 'bench_vit_small_b2.log').write_text(json.dumps(row) + '\n')
    (out / 'env.json').write_text(json.dumps(dict(device='H100', memory_gib=79.2, torch='2',
                                                  cuda='13')))
    (out / 'steps.tsv').write_text(
        f'pretrain_vit_bf16\tok\t0\t30\t{two} train_pretrain.py --preset demo\n'
        f'resume_vit_bf16\tok\t0\t20\t{two} train_pretrain.py --resume auto\n'
        'bench_vit_small_b2\tok\t0\t9\tpython3 bench.py --arch vit_small -b 2\n')
    r = subprocess.run([sys.executable, '-', str(out)], input=summary, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, json.load(open(out / 'results.json')), r.stderr


def test_summary_reads_two_processes_and_the_resumed_line(tmp_path, capsys):
    rc, res, err = summarise(tmp_path / 'a', 'resumed from out/checkpoint_last.pth at epoch 2')
    assert rc == 0 and res['problems'] == [], err
    pretrain, resume = res['pretrain']
    assert (pretrain['processes'], pretrain['backend'], pretrain['fell']) == (2, 'gloo', True)
    assert resume['resumed'] is True and resume['said_resumed'] is True
    assert res['vit_small_plain']['largest_batch'] == 2
    rc, res, _ = summarise(tmp_path / 'b', 'starting afresh')   # the rows kept, the line missing
    assert rc == 1 and [p.split(':')[0] for p in res['problems']] == ['resume_vit_bf16']

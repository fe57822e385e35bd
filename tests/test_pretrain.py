"""Tests of train_pretrain.py: schedules, recipes and presets as parser defaults, the official
commands, end-to-end steps on tiny generated data (ViT and ResNet), 2-process gloo DDP, exact
resume, bad input and the NaN stop."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402
import data as data_lib  # noqa: E402
import evaluation  # noqa: E402
import checkpoint  # noqa: E402
import launch  # noqa: E402
import moco  # noqa: E402
import train_pretrain as tp  # noqa: E402


# ----------------------------------------------------------------------------- tiny data
@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """2 classes x 8 train images and x 4 val images of 16 px: a bright square or a bright
    disc on noise."""
    root = tmp_path_factory.mktemp('tiny')
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing='ij')
    for split, n in (('train', 8), ('val', 4)):
        for label, name in enumerate(('disc', 'square')):
            os.makedirs(root / split / name)
            for i in range(n):
                img = torch.rand(3, 16, 16, generator=g) * 0.5
                cx, cy = torch.randint(5, 11, (2,), generator=g).tolist()
                mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < 16) if label == 0 else \
                    ((xx - cx).abs() < 4) & ((yy - cy).abs() < 4)
                img[:, mask] = 1.0
                Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(
                    root / split / name / f'{i}.png')
    return str(root)


def args_for(data, out, *extra):
    """A tiny run: batch 8 of 16-px images -> 2 steps per epoch."""
    return tp.parse_args(
        [data, '--output-dir', str(out), '--knn-data', data, '-b', '8', '--epochs', '1',
         '--img-size', '16', '--moco-dim', '16', '--moco-mlp-dim', '32', '--workers', '0',
         '--print-freq', '1', *extra])


VIT = ('--preset', 'demo', '--lr', '1e-3', '--warmup-epochs', '1')  # the demo's small ViT, patch 4
RESNET = ('--arch', 'resnet18', '--lr', '0.6')


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def log_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


# ---------------------------------------------------------------------------- schedules and recipes
def test_learning_rate_schedule():
    f = lambda e: tp.adjust_learning_rate(e, 1.0, 10, 100)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)                          # linear warmup
    assert f(10) == pytest.approx(1.0)
    assert f(32.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))   # a quarter into the cosine
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_momentum_schedule():
    f = lambda e: moco.adjust_moco_momentum(e, 0.99, 100)  # noqa: E731
    assert f(0) == pytest.approx(0.99)
    assert f(50) == pytest.approx(0.995)
    assert f(100) == pytest.approx(1.0)
    assert f(25) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)


def recipe(*argv):
    args = tp.parse_args(['/data', *argv])
    return args, tp.backbone_kwargs(args)


def resolved(*argv):
    args = tp.parse_args(['/data', *argv])
    return (args.optimizer, args.lr, args.weight_decay, args.moco_t, args.moco_m, args.crop_min,
            args.head_bn, args.predictor, args.stop_grad_conv1)


def test_framework_recipes_are_their_papers():
    """SimCLR and BYOL: on ViTs the lr and wd of the MoCo v3 paper (Fig. 6), on ResNets their own
    papers' LARS recipes; tau and m of their own papers; their heads."""
    assert resolved('-a', 'vit_base', '--framework', 'simclr') == \
        ('adamw', 2e-4, 0.1, 0.1, 0.0, 0.08, 'all', False, True)
    assert resolved('-a', 'resnet50', '--framework', 'simclr') == \
        ('lars', 0.3, 1e-6, 0.1, 0.0, 0.08, 'all', False, False)
    assert resolved('-a', 'vit_base', '--framework', 'byol') == \
        ('adamw', 1e-4, 0.03, 1.0, 0.996, 0.08, 'hidden', True, True)
    assert resolved('-a', 'resnet50', '--framework', 'byol') == \
        ('lars', 0.2, 1.5e-6, 1.0, 0.996, 0.08, 'hidden', True, False)
    # MoCo v3's longer R-50 rows are MoCo v3's alone
    longer = resolved('-a', 'resnet50', '--framework', 'byol', '--epochs', '1000')
    assert longer[1:3] == (0.2, 1.5e-6)
    # the demo preset's values win over the framework's recipe; flags win over both
    assert resolved('--preset', 'demo', '--framework', 'byol')[1] == 2e-3
    assert resolved('--framework', 'byol', '-a', 'vit_small', '--moco-m', '0.99')[4] == 0.99
    with pytest.raises(ValueError, match='SimCLR has no predictor'):
        tp.build_model(tp.parse_args(['/d', '--framework', 'simclr', '--predictor']))


def test_recipes():
    args, kwargs = recipe('--arch', 'vit_base')
    assert ((args.optimizer, args.lr, args.weight_decay, args.epochs, args.warmup_epochs,
             args.moco_t, args.batch_size, args.crop_min, args.moco_m, args.moco_mlp_dim,
             args.moco_dim)
            == ('adamw', 1.5e-4, 0.1, 300, 40, 0.2, 4096, 0.08, 0.99, 4096, 256))
    assert args.moco_m_cos and kwargs == {'img_size': 224, 'stop_grad_conv1': True}
    args, kwargs = recipe('-a', 'resnet50')
    assert ((args.optimizer, args.lr, args.weight_decay, args.moco_m, args.moco_t,
             args.warmup_epochs, args.crop_min, args.batch_size, args.epochs)
            == ('lars', 0.6, 1e-6, 0.99, 1.0, 10, 0.2, 4096, 100))
    assert args.moco_m_cos and kwargs == {'zero_init_residual': True}   # as the official code
    args, _ = recipe('-a', 'resnet50', '--epochs', '300')
    assert (args.lr, args.weight_decay, args.moco_m) == (0.3, 1e-6, 0.99)
    args, _ = recipe('-a', 'resnet50', '--epochs', '1000')
    assert (args.lr, args.weight_decay, args.moco_m) == (0.3, 1.5e-6, 0.996)
    # flags the user gives win over the recipe, including switching a recipe's boolean off
    args, kwargs = recipe('-a', 'vit_small', '--lr', '1e-3', '--no-moco-m-cos',
                          '--no-stop-grad-conv1', '--optimizer', 'lamb', '--patch-size', '8',
                          '--img-size', '64')
    assert (args.lr, args.moco_m_cos, args.optimizer) == (1e-3, False, 'lamb')
    assert kwargs == {'img_size': 64, 'stop_grad_conv1': False, 'patch_size': 8}
    _, kwargs = recipe('-a', 'vit_small', '--depth', '0')    # a given 0 is given, not the default
    assert kwargs['depth'] == 0


# ----------------------------------------------------------------------------- end to end
def check_run(out, iters, lr, warmup, epochs):
    """The checkpoint loads with weights_only and the log's lr / m follow the schedules
    step by step."""
    ckpt = load(os.path.join(out, 'checkpoint_last.pth'))
    assert ckpt['epoch'] == epochs
    rows = [r for r in log_rows(out) if 'loss' in r]
    assert [r['step'] for r in rows] == list(range(epochs * iters))
    for r in rows:
        e = r['step'] / iters
        assert r['lr'] == pytest.approx(tp.adjust_learning_rate(e, lr, warmup, epochs))
        assert r['m'] == pytest.approx(
            moco.adjust_moco_momentum(e, ckpt['args']['moco_m'], epochs, True))
        assert math.isfinite(r['loss']) and r['grad_last'] > 0
    return ckpt, rows


def test_two_steps_vit(data, tmp_path):
    tp.main(args_for(data, tmp_path, '--stop-grad-conv1', *VIT))
    ckpt, rows = check_run(str(tmp_path), 2, 1e-3 * 8 / 256, 1, 1)
    assert all(r['grad_first'] is None for r in rows)  # frozen patch projection: no gradient
    torch.manual_seed(0)  # main's seed: the same initial weights
    init = moco.build_moco('vit_tiny', 16, 32, 0.2, **ckpt['backbone_kwargs']).state_dict()
    sd = ckpt['state_dict']
    assert torch.equal(sd['base_encoder.patch_embed.proj.weight'],
                       init['base_encoder.patch_embed.proj.weight'])
    assert not torch.equal(sd['base_encoder.blocks.0.attn.qkv.weight'],
                           init['base_encoder.blocks.0.attn.qkv.weight'])
    model = moco.build_moco(ckpt['arch'], 16, 32, **ckpt['backbone_kwargs'])
    model.load_state_dict(sd)  # bare, official layout: loads strictly
    assert ckpt['args']['optimizer'] == 'adamw' and ckpt['scaler'] is None


def test_two_steps_resnet(data, tmp_path):
    tp.main(args_for(data, tmp_path, *RESNET))
    ckpt, rows = check_run(str(tmp_path), 2, 0.6 * 8 / 256, 10, 1)
    assert all(r['grad_first'] > 0 for r in rows)
    assert ckpt['arch'] == 'resnet18' and 'base_encoder.fc.0.weight' in ckpt['state_dict']
    assert all('mu' in s for s in ckpt['optimizer']['state'].values())     # LARS state


def losses(out):
    """step -> loss of the logged steps (the log keeps only what the run has done, also
    after a resume)."""
    return {r['step']: r['loss'] for r in log_rows(out) if 'loss' in r}


def test_exact_resume(data, tmp_path):
    """A run stopped after any saved checkpoint and resumed logs bit-identical losses for every
    remaining step, and ends with bit-identical weights and optimizer state. No RNG state is saved:
    none is needed."""
    common = ('--epochs', '3', '--workers', '1', *VIT)
    tp.main(args_for(data, tmp_path / 'a', '--save-every', '1', *common))
    a = load(tmp_path / 'a' / 'checkpoint_last.pth')
    assert 'rng' not in a and set(a) == {'state_dict', 'arch', 'framework', 'backbone_kwargs',
                                         'epoch', 'optimizer', 'scaler', 'knn_init', 'args'}
    full = losses(tmp_path / 'a')
    assert sorted(full) == list(range(6))
    for stop in (1, 2):                                        # a --save-every checkpoint, by path
        out = tmp_path / f'from{stop}'
        tp.main(args_for(data, out,
                         '--resume', str(tmp_path / 'a' / f'checkpoint_{stop:04d}.pth'), *common))
        resumed = losses(out)
        # bit-identical floats
        assert resumed == {s: v for s, v in full.items() if s >= 2 * stop}, stop
        b = load(out / 'checkpoint_last.pth')
        for k, v in a['state_dict'].items():
            assert torch.equal(v, b['state_dict'][k]), k
        for i, s in a['optimizer']['state'].items():
            assert all(torch.equal(v, b['optimizer']['state'][i][n]) for n, v in s.items())
    # --resume auto in a run dir stopped after epoch 2: the log keeps epochs 1-2 and redoes nothing
    # twice
    stopped = tmp_path / 'stopped'
    stopped.mkdir()
    (stopped / 'checkpoint_last.pth').write_bytes(
        (tmp_path / 'a' / 'checkpoint_0002.pth').read_bytes())
    # holds epoch 3 too
    (stopped / 'log.jsonl').write_text(open(tmp_path / 'a' / 'log.jsonl').read())
    tp.main(args_for(data, stopped, '--resume', 'auto', *common))
    assert losses(stopped) == full
    assert [r['epoch'] for r in log_rows(stopped) if 'knn_top1' in r] == [0, 1, 2, 3]
    one = load(tmp_path / 'a' / 'checkpoint_0001.pth')
    assert not torch.equal(one['state_dict']['predictor.0.weight'],
                           a['state_dict']['predictor.0.weight'])


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


CHILD = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import augment, data, evaluation, train_pretrain as tp
root, out = sys.argv[2], sys.argv[3]
run_epoch = tp.train_one_epoch
def train_one_epoch(model, *a, **k):                # keep every rank's weights after the epoch
    raw_model = model.module
    forward, local = raw_model.forward, []
    def recording(*inputs):                          # this rank's own step losses
        loss = forward(*inputs)
        local.append(loss.item())
        return loss
    raw_model.forward = recording
    mean = run_epoch(model, *a, **k)
    torch.save({'mean': mean, 'local': local}, f'{out}/loss{dist.get_rank()}.pth')
    raw_model.forward = forward
    params = {n: p.detach() for n, p in raw_model.named_parameters()}
    torch.save(params, f'{out}/rank{dist.get_rank()}.pth')
    # the gathered features of a sharded loader equal one process's features of the set, in order
    ds = data.image_folder(root + '/val', augment.eval_transform(16))
    loader = data.make_loader(ds, 3, dist.get_rank(), 2, 0, False, False, 0)
    f, l = evaluation.extract_features(raw_model.base_encoder, loader, torch.device('cpu'))
    whole = torch.utils.data.DataLoader(ds, 5)
    ref, ref_l = evaluation.extract_features(raw_model.base_encoder, whole, torch.device('cpu'))
    equal = torch.allclose(f, ref, atol=1e-5) and torch.equal(l, ref_l)
    torch.save({'equal': equal}, f'{out}/gather{dist.get_rank()}.pth')
    return mean
tp.train_one_epoch = train_one_epoch
tp.main(tp.parse_args(sys.argv[4:]))
"""


def test_two_process_gloo(data, tmp_path):
    script = tmp_path / 'child.py'
    script.write_text(CHILD)
    args = [data, '--output-dir', str(tmp_path), '--knn-data', data, '-b', '8', '--epochs', '1',
            '--img-size', '16', '--moco-dim', '16', '--moco-mlp-dim', '32', '--workers', '0', *VIT]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={free_port()}', str(script),
                        ROOT, data, str(tmp_path), *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # DDP averages the gradients: every parameter is the same in both processes. (BN running
    # statistics are per process on CPU, where there is no SyncBatchNorm; DDP broadcasts rank 0's at
    # each forward.)
    w0, w1 = load(tmp_path / 'rank0.pth'), load(tmp_path / 'rank1.pth')
    assert len(w0) > 50 and all(torch.equal(v, w1[k]) for k, v in w0.items())
    assert load(tmp_path / 'gather0.pth')['equal'] and load(tmp_path / 'gather1.pth')['equal']
    # the epoch's loss is the mean over both ranks' steps, not rank 0's own mean
    l0, l1 = load(tmp_path / 'loss0.pth'), load(tmp_path / 'loss1.pth')
    both = l0['local'] + l1['local']
    assert l0['mean'] == l1['mean'] == pytest.approx(sum(both) / len(both), rel=1e-6)
    assert l0['local'] != l1['local']                # the shards differ: the test can fail
    epoch_rows = [r for r in log_rows(tmp_path) if 'loss_avg' in r and r['epoch'] == 1]
    assert epoch_rows[0]['loss_avg'] == l0['mean']
    ckpt = load(tmp_path / 'checkpoint_last.pth')
    # 2 steps of 8 = 2 processes x 4
    assert max(losses(tmp_path)) == 1 and ckpt['args']['batch_size'] == 8
    init = moco.build_moco('vit_tiny', 16, 32, 0.2, **ckpt['backbone_kwargs']).state_dict()
    assert not torch.equal(ckpt['state_dict']['predictor.0.weight'], init['predictor.0.weight'])


def test_user_error_said_once_under_torchrun(tmp_path):
    """torchrun with 2 processes and a bad DATA: one error line (rank 0's), and both
    processes exit non-zero."""
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={free_port()}', os.path.join(ROOT, 'train_pretrain.py'),
                        str(tmp_path / 'nowhere'), '--arch', 'resnet18'],
                       env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert said == [f'error: data folder {tmp_path / "nowhere"} does not exist'], r.stderr[-2000:]
    assert 'train_pretrain.py", line' not in r.stderr                     # no traceback of ours
    # torchrun's report: both processes failed (exit 1, or killed once the other had failed)
    assert r.stderr.count('exitcode') >= 2 and 'exitcode  : 0' not in r.stderr


# ------------------------------------------------------------------------ the user's first commands
def test_data_is_required_unless_demo(tmp_path):
    args = tp.parse_args(['--arch', 'vit_base'])
    assert args.data is None and args.preset is None and args.batch_size == 4096
    with pytest.raises(ValueError, match='DATA is required') as e:
        tp.main(args)
    assert '\n' not in str(e.value) and '--preset demo' in str(e.value)
    for argv in ([], ['--preset', 'demo']):  # the demo: built-in data, its small ViT
        args = tp.parse_args(argv)
        assert (args.preset, args.data, args.knn_data, args.arch, args.depth, args.img_size) == \
            ('demo', data_lib.DEMO_ROOT, data_lib.DEMO_ROOT, 'vit_tiny', 4, 32)
    # kNN on DATA itself
    assert tp.parse_args(['--preset', 'demo', '/my/data']).knn_data == '/my/data'
    assert tp.parse_args(['--preset', 'demo', '/d', '--knn-data', '/k']).knn_data == '/k'
    args = tp.parse_args(['--preset', 'demo', '--arch', 'resnet18', '--epochs', '300'])  # flags win
    assert ((args.arch, args.depth, args.epochs, args.img_size, args.optimizer)
            == ('resnet18', None, 300, 32, 'lars'))


def test_help_shows_the_recipe_of_the_arch(capsys):
    for argv, shown in ((['--arch', 'vit_base'], '0.00015'),
                        (['-a', 'resnet50', '--epochs', '300'], '0.3')):
        with pytest.raises(SystemExit):
            tp.parse_args(argv + ['--help'])
        text = ' '.join(capsys.readouterr().out.split())
        assert f'the run uses lr x batch/256 (default: {shown})' in text, text


# The commands of the official CONFIG.md, with `python main_moco.py` -> this script and the
# placeholders filled.
CONFIG_MD = {
    'r50_100ep': ("--moco-m-cos --crop-min=.2 --dist-url 'tcp://node0:10001' "
                  "--multiprocessing-distributed --world-size 2 --rank 0 /data/imagenet",
                  dict(arch='resnet50', lr=0.6, epochs=100, weight_decay=1e-6, moco_m=0.99,
                       crop_min=0.2, optimizer='lars', batch_size=4096, moco_t=1.0,
                       warmup_epochs=10)),
    'r50_300ep': ("--lr=.3 --epochs=300 --moco-m-cos --crop-min=.2 --dist-url 'tcp://node0:10001' "
                  "--multiprocessing-distributed --world-size 2 --rank 0 /data/imagenet",
                  dict(lr=0.3, epochs=300, weight_decay=1e-6, moco_m=0.99)),
    'r50_1000ep': ("--lr=.3 --wd=1.5e-6 --epochs=1000 --moco-m=0.996 --moco-m-cos --crop-min=.2 "
                   "--dist-url 'tcp://node0:10001' --multiprocessing-distributed --world-size 2 "
                   "--rank 0 /data/imagenet",
                   dict(lr=0.3, epochs=1000, weight_decay=1.5e-6, moco_m=0.996)),
    'vit_small_1node': ("-a vit_small -b 1024 --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 "
                        "--epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos "
                        "--moco-t=.2 --dist-url 'tcp://localhost:10001' "
                        "--multiprocessing-distributed --world-size 1 --rank 0 /data/imagenet",
                        dict(arch='vit_small', batch_size=1024, optimizer='adamw', lr=1.5e-4,
                             weight_decay=0.1, epochs=300, warmup_epochs=40, stop_grad_conv1=True,
                             moco_m_cos=True, moco_t=0.2)),
    'vit_base_8node': ("-a vit_base --optimizer=adamw --lr=1.5e-4 --weight-decay=.1 --epochs=300 "
                       "--warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2 --dist-url "
                       "'tcp://node0:10001' --multiprocessing-distributed --world-size 8 --rank 0 "
                       "/data/imagenet",
                       dict(arch='vit_base', batch_size=4096, crop_min=0.08, moco_m=0.99)),
}


@pytest.mark.parametrize('name', CONFIG_MD)
def test_official_config_md_commands_parse_unchanged(name):
    import shlex
    command, expected = CONFIG_MD[name]
    args = tp.parse_args(shlex.split(command))
    assert (args.data == '/data/imagenet' and args.launch_mp
            and args.launch_world_size in ('1', '2', '8'))
    assert {k: getattr(args, k) for k in expected} == expected


def test_moco_m_zero_is_zero_at_every_step(data, tmp_path):
    assert [moco.adjust_moco_momentum(e, 0.0, 10, cos)
            for e in (0, 3.3, 10) for cos in (True, False)] == [0.0] * 6
    assert moco.adjust_moco_momentum(5, 0.99, 10, False) == 0.99
    tp.main(args_for(data, tmp_path, '--moco-m', '0', *VIT))
    assert [r['m'] for r in log_rows(tmp_path) if 'loss' in r] == [0.0, 0.0]


def test_log_file_gets_plain_lines_not_bar_frames(data, tmp_path, capsys):
    tp.main(args_for(data, tmp_path, *VIT))  # under pytest stdout is not a terminal
    captured = capsys.readouterr()
    assert '\r' not in captured.out + captured.err
    assert [line.split(':')[0] for line in captured.out.splitlines() if ' step ' in line] == \
        ['epoch 1 step 1/2', 'epoch 1 step 2/2']


# ----------------------------------------------------------------------------- faults and bad input
def fails(args, match):
    with pytest.raises(ValueError) as e:
        tp.main(args)
    msg = str(e.value)
    assert '\n' not in msg and match in msg, msg
    return msg


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train_pretrain.py'), *map(str, argv)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_bad_data(data, tmp_path):
    fails(args_for(str(tmp_path / 'nowhere'), tmp_path / 'o', *VIT), 'does not exist')
    (tmp_path / 'empty').mkdir()
    fails(args_for(str(tmp_path / 'empty'), tmp_path / 'o', *VIT), 'train')
    (tmp_path / 'empty' / 'train' / 'cls').mkdir(parents=True)
    fails(args_for(str(tmp_path / 'empty'), tmp_path / 'o', *VIT), 'no images')
    fails(args_for(data, tmp_path / 'o', '-b', '64', *VIT), 'fewer than a batch')
    import shutil
    other = tmp_path / 'other'  # kNN labels index the class lists: they must agree
    shutil.copytree(data, other)
    shutil.rmtree(other / 'val' / 'disc')
    args = args_for(data, tmp_path / 'o', *VIT)
    args.knn_data = str(other)
    fails(args, 'classes of')


def test_unreadable_image_is_named(data, tmp_path):
    import shutil
    bad = tmp_path / 'bad'
    shutil.copytree(data, bad)
    (bad / 'train' / 'disc' / 'broken.png').write_bytes(b'not a png')
    fails(args_for(str(bad), tmp_path / 'o', *VIT), 'broken.png')
    # raised in a loader worker, it reaches the main process with the worker's traceback: the CLI
    # says one line
    r = run_cli(bad, '--output-dir', tmp_path / 'o', '-b', '8', '--epochs', '1', '--img-size', '16',
                '--moco-mlp-dim', '32', '--workers', '1', *VIT)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert (len(lines) == 1 and lines[0].startswith('error: cannot read image ')
            and 'broken.png' in lines[0])


def test_bad_arch_optimizer_batch(data, tmp_path, monkeypatch, capsys):
    for flag, value in (('--arch', 'vit_gigantic'), ('--optimizer', 'sgd'),
                        ('--framework', 'dino')):
        with pytest.raises(SystemExit) as e:
            args_for(data, tmp_path, flag, value)
        # argparse: usage + one error line
        assert e.value.code == 2 and value in capsys.readouterr().err
    monkeypatch.setattr(tp.launch, 'setup', lambda: launch.Run(0, 3, 0, torch.device('cpu')))
    fails(args_for(data, tmp_path, *VIT), 'not divisible by 3')


def test_resume_from_non_checkpoint(data, tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'notes.txt'), *VIT),
          'not a readable checkpoint')
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'other.pth')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'other.pth'), *VIT),
          'not a MoCo v3 training checkpoint')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'missing.pth'), *VIT), 'no such file')
    fails(args_for(data, tmp_path, '--pretrained', str(tmp_path / 'other.pth'), *VIT),
          'does not fit')


def test_command_line_error_has_no_traceback(tmp_path):
    r = run_cli(tmp_path / 'nowhere')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f'error: data folder {tmp_path / "nowhere"} does not exist']


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    forward, calls = moco.MoCo.forward, []

    def poisoned(self, x1, x2, m):                             # epoch 2, step 1 returns NaN
        calls.append(1)
        loss = forward(self, x1, x2, m)
        return loss * float('nan') if len(calls) == 4 else loss
    monkeypatch.setattr(moco.MoCo, 'forward', poisoned)
    msg = fails(args_for(data, tmp_path, '--epochs', '2', '--save-every', '1', *VIT), 'nan or inf')
    assert 'epoch 2' in msg
    last = load(tmp_path / 'checkpoint_last.pth')
    assert last['epoch'] == 1
    kept = load(tmp_path / 'checkpoint_0001.pth')
    assert all(torch.equal(v, kept['state_dict'][k]) and v.isfinite().all()
               for k, v in last['state_dict'].items())


# ----------------------------------------------------------------------------- the paper's studies
STUDIES = {   # flags -> what must differ from the default run's model (and nothing else)
    ('--framework', 'simclr'): dict(gone=('momentum_encoder.', 'predictor.')),
    ('--framework', 'byol'): dict(bn_out=0),
    ('--no-predictor',): dict(gone=('predictor.',)),
    ('--head-bn', 'hidden'): dict(bn_out=0),
    ('--head-bn', 'none'): dict(bn_hidden=0, bn_out=0),
    ('--pos-embed', 'learned'): dict(trained='base_encoder.pos_embed'),
    ('--pos-embed', 'none'): dict(kwargs={'pos_embed': 'none'}),
    ('--pool', 'avg'): dict(gone=('base_encoder.cls_token', 'momentum_encoder.cls_token'),
                            tokens=16),
    ('--pool', 'avg', '--no-final-norm'): dict(
        gone=('base_encoder.cls_token', 'momentum_encoder.cls_token',
              'base_encoder.norm.', 'momentum_encoder.norm.'), tokens=16),
    ('--stop-grad-conv1',): dict(frozen='base_encoder.patch_embed.proj.weight'),
    ('--grad-ckpt',): dict(kwargs={'grad_ckpt': True}),
    ('--optimizer', 'lamb'): dict(),
    ('--optimizer', 'lars'): dict(),
    ('--moco-m', '0'): dict(),
}


@pytest.fixture(scope='module')
def default_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('default')
    tp.main(args_for(data, out, *VIT))
    return load(out / 'checkpoint_last.pth')


def parts(state):
    """The backbones' keys and shapes; the heads' Linear shapes; their BNs by width
    (hidden 32, output 16)."""
    heads = ('.head.', 'predictor.')
    backbone = {k: v.shape for k, v in state.items() if not any(h in k for h in heads)}
    linears = sorted((k.split('.')[0], tuple(v.shape)) for k, v in state.items()
                     if any(h in k for h in heads) and v.ndim == 2)
    bn = [v.numel() for k, v in state.items()
          if any(h in k for h in heads) and k.endswith('running_mean')]
    return backbone, linears, bn.count(32), bn.count(16)


@pytest.mark.parametrize('flags', STUDIES, ids=' '.join)
def test_each_study_runs_two_steps_and_changes_only_its_part(data, tmp_path, default_run, flags):
    spec = STUDIES[flags]
    tp.main(args_for(data, tmp_path, *VIT, *flags))
    ckpt = load(tmp_path / 'checkpoint_last.pth')
    rows = [r for r in log_rows(tmp_path) if 'loss' in r]
    assert len(rows) == 2 and all(math.isfinite(r['loss']) for r in rows)
    gone = spec.get('gone', ())
    ref = {k: v for k, v in default_run['state_dict'].items() if not k.startswith(gone)}
    got = ckpt['state_dict']
    (ref_bb, ref_lin, ref_hid, ref_out), (bb, lin, hid, out) = parts(ref), parts(got)
    if 'tokens' in spec:  # 16 patches, no class token: 16 rows
        assert (bb.pop('base_encoder.pos_embed')[1] == spec['tokens']
                == ref_bb.pop('base_encoder.pos_embed')[1] - 1)
        bb.pop('momentum_encoder.pos_embed'), ref_bb.pop('momentum_encoder.pos_embed')
    assert bb == ref_bb and lin == ref_lin  # nothing else in the backbones and heads changed
    assert ((hid, out) == (spec.get('bn_hidden', ref_hid), spec.get('bn_out', ref_out))
            and ref_out > 0)
    assert ckpt['framework'] == dict(zip(flags, flags[1:])).get('--framework', 'mocov3')
    for k, v in spec.get('kwargs', {}).items():
        assert ckpt['backbone_kwargs'][k] == v
    # every framework: linear, kNN, ...
    model = checkpoint.load_backbone(str(tmp_path / 'checkpoint_last.pth'))
    assert model.eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 128)
    torch.manual_seed(0)  # main's seed: the initial weights
    init = moco.build_moco('vit_tiny', 16, 32, 0.2, **ckpt['backbone_kwargs']).state_dict()
    if 'trained' in spec:  # a learned embedding trains
        assert not torch.equal(got[spec['trained']], init[spec['trained']])
    if 'frozen' in spec:  # a frozen one keeps its init
        assert torch.equal(got[spec['frozen']], init[spec['frozen']])
    if flags == ('--moco-m', '0'):
        assert [r['m'] for r in rows] == [0.0, 0.0]


def test_default_run_is_the_old_one(default_run):
    """The default MoCo v3 model keeps the official layout: the framework switch changed
    nothing in it."""
    assert (default_run['framework'] == 'mocov3'
            and 'base_encoder.cls_token' in default_run['state_dict'])
    torch.manual_seed(0)
    reference = moco.build_moco('vit_tiny', 16, 32, 0.2,
                                **default_run['backbone_kwargs']).state_dict()
    assert reference.keys() == default_run['state_dict'].keys()


def test_knn_every_n_epochs_and_at_the_end(data, tmp_path):
    tp.main(args_for(data, tmp_path, *VIT, '--epochs', '3', '--knn-every', '2'))
    knn = {r['epoch']: r['knn_top1'] for r in log_rows(tmp_path) if 'loss_avg' in r}
    assert list(knn) == [0, 1, 2, 3]
    assert knn[1] is None and all(knn[e] is not None for e in (0, 2, 3))


def test_default_dtype_follows_the_cpu(data, tmp_path, monkeypatch, capsys):
    """bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere: said at start and in
    config.json."""
    for native, name in ((True, 'bf16'), (False, 'fp32')):
        monkeypatch.setattr(launch, 'cpu_has_native_bf16', lambda: native)
        out = tmp_path / name
        tp.main(args_for(data, out, *VIT))
        assert f'; {name} on cpu;' in capsys.readouterr().out
        assert json.load(open(out / 'config.json'))['dtype_used'] == name


def test_compile_keeps_the_checkpoint_layout_and_the_numbers(data, tmp_path):
    """--compile compiles the encoders and heads in place: the saved keys are the eager run's,
    and the logged losses agree up to kernel rounding."""
    eager, compiled = tmp_path / 'eager', tmp_path / 'compiled'
    tp.main(args_for(data, eager, *VIT, '--dtype', 'fp32', '--knn-data', ''))
    tp.main(args_for(data, compiled, *VIT, '--dtype', 'fp32', '--knn-data', '', '--compile'))
    a, b = load(eager / 'checkpoint_last.pth'), load(compiled / 'checkpoint_last.pth')
    assert list(a['state_dict']) == list(b['state_dict'])
    assert [r['loss'] for r in log_rows(compiled) if 'loss' in r] == pytest.approx(
        [r['loss'] for r in log_rows(eager) if 'loss' in r], rel=1e-4)

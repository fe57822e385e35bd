"""Tests for train_linear.py: accuracy/evaluate/kNN on hand-made cases, the official sanity check,
loading an official-layout checkpoint, 2 epochs end to end with exact resume,
2 processes == 1 process, 1 process in torchrun's environment == the plain run (and its process
group ends with main), bad input."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import evaluation  # noqa: E402
import launch  # noqa: E402
import moco  # noqa: E402
import train_linear as tl  # noqa: E402
from evaluation import knn_predict  # noqa: E402

# a tiny ViT: fast on 2 cores
VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
PYTHONPATH = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def make_data(root, n_train=8, n_val=4):
    """3 classes of solid-colour 16 px images (a class colour + per-image jitter). A crop of a solid
    image is the same image, so augmentation draws do not matter: 1 vs 2 processes and resume can be
    compared exactly."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c, colour in enumerate(COLOURS):
            os.makedirs(os.path.join(root, split, f'class{c}'))
            for i in range(n):
                rgb = tuple(int(v)
                            for v in np.clip(np.array(colour) + rng.integers(-30, 31, 3), 0, 255))
                Image.new('RGB', (16, 16), rgb).save(
                    os.path.join(root, split, f'class{c}', f'{i}.png'))
    return str(root)


def make_pretrained(path, arch, official=False, **kwargs):
    """A MoCo checkpoint: ours (bare keys, arch, backbone_kwargs) or the official layout
    ('module.*')."""
    torch.manual_seed(1)
    m = moco.build_moco(arch, dim=8, mlp_dim=16, **kwargs)
    if official:
        ckpt = {'epoch': 100, 'arch': arch,
                'state_dict': {'module.' + k: v for k, v in m.state_dict().items()},
                'optimizer': {'state': {}, 'param_groups': []}}
    else:
        ckpt = {'state_dict': m.state_dict(), 'arch': arch, 'backbone_kwargs': kwargs, 'epoch': 1,
                'step': 1, 'args': {}}
    torch.save(ckpt, path)
    return m


def run(data, out, *flags):
    args = tl.parse_args([str(data), '--output-dir', str(out), '-j', '0', *map(str, flags)])
    return tl.main(args)


# ----------------------------------------------------------------------------- metrics
def test_accuracy_hand_made():
    out = torch.tensor([[0.9, 0.5, 0.1, 0.0, -1.0, -2.0],    # target 0: rank 1
                        [0.9, 0.5, 0.1, 0.0, -1.0, -2.0],    # target 2: rank 3
                        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],      # target 0: rank 6
                        [0.3, 0.9, 0.0, 0.1, 0.2, 0.8]])     # target 5: rank 2
    target = torch.tensor([0, 2, 0, 5])
    assert evaluation.accuracy(out, target, topk=(1, 2, 3, 5, 6)) == [25.0, 50.0, 75.0, 75.0, 100.0]
    # k > C: all
    assert evaluation.accuracy(out[:, :3], torch.tensor([0, 2, 0, 1]), topk=(1, 5)) == [50.0, 100.0]


def test_evaluate_hand_made():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [0.0, 0.0, 1.0],
                           [5.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, 1, 2, 1])
    loader = [(logits[:3], target[:3]), (logits[3:], target[3:])]
    stats = evaluation.evaluate(nn.Identity(), loader, torch.device('cpu'))
    ce = [math.log(sum(math.exp(v) for v in row)) - row[t]
          for row, t in zip(logits.tolist(), target.tolist())]
    assert stats['top1'] == pytest.approx(40.0) and stats['top5'] == pytest.approx(100.0)
    assert stats['loss'] == pytest.approx(sum(ce) / 5, rel=1e-6)


def test_knn_known_answer():
    # train: class 0 along x, class 1 along y; the query is at 30 degrees from x, 60 from y
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    c30, c60 = math.cos(math.pi / 6), math.cos(math.pi / 3)
    scores = knn_predict(train, labels, query, num_classes=2, k=4, T=0.5)
    assert scores[0].tolist() == pytest.approx([2 * math.exp(c30 / 0.5), 2 * math.exp(c60 / 0.5)],
                                               rel=1e-5)
    # the 2 nearest: both class 0
    scores = knn_predict(train, labels, query, num_classes=2, k=2, T=0.5)
    assert scores[0].tolist() == pytest.approx([2 * math.exp(c30 / 0.5), 0.0], rel=1e-5)
    assert evaluation.accuracy(scores, torch.tensor([0]))[0] == 100.0


# --------------------------------------------------------------------- loading and the sanity check
def test_official_layout_loads_with_fresh_head(tmp_path):
    m = make_pretrained(tmp_path / 'r18.pth.tar', 'resnet18', official=True)
    # no img_size
    assert tl.checkpoint_defaults(str(tmp_path / 'r18.pth.tar')) == {'arch': 'resnet18'}
    args = tl.parse_args(['/data', '--pretrained', str(tmp_path / 'r18.pth.tar')])
    assert (args.arch, args.lr, args.img_size) == ('resnet18', 0.1, 224)  # CONFIG.md: ResNet lr 0.1
    torch.manual_seed(0)
    model, key = tl.build_model(str(tmp_path / 'r18.pth.tar'), 'resnet18', 1000)
    assert key == 'fc' and not model.training
    for k, v in m.base_encoder.state_dict().items():  # weights and BN buffers
        if not k.startswith('fc.'):
            assert torch.equal(model.state_dict()[k], v), k
    w = model.fc.weight  # (1000, 512): N(0, 0.01)
    assert abs(w.mean().item()) < 1e-4 and w.std().item() == pytest.approx(0.01, rel=0.01)
    assert torch.equal(model.fc.bias, torch.zeros(1000))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ['fc.weight', 'fc.bias']


def test_sanity_check_catches_weight_and_bn_buffer(tmp_path):
    make_pretrained(tmp_path / 'r18.pth', 'resnet18')
    model, key = tl.build_model(str(tmp_path / 'r18.pth'), 'resnet18', 3)
    # what the script compares to
    ref = checkpoint.load_backbone(str(tmp_path / 'r18.pth')).state_dict()
    model.fc.weight.data += 1.0  # the head may change
    tl.sanity_check(model, ref, key)
    for name in ('layer2.0.conv1.weight', 'layer3.1.bn2.running_mean', 'bn1.running_var'):
        t = model.state_dict()[name]
        t.view(-1)[0] += 1e-3  # in place: the model's tensor
        with pytest.raises(RuntimeError, match=name.replace('.', r'\.')):
            tl.sanity_check(model, ref, key)
        t.view(-1)[0] -= 1e-3
        model.load_state_dict({**model.state_dict(), name: ref[name]})  # restore bit-exactly
    model.train()(torch.randn(2, 3, 16, 16))  # BN in train mode moves stats
    with pytest.raises(RuntimeError, match='running_mean'):
        tl.sanity_check(model, ref, key)


# ----------------------------------------------------------------------------- end to end
def test_two_epochs_bn_frozen_and_exact_resume(tmp_path):
    # a conv-stem ViT: BatchNorm in the backbone, so training in train mode would move running
    # statistics and the sanity check at the end of every run below would fail
    data = make_data(tmp_path / 'data')
    make_pretrained(tmp_path / 'vit.pth', 'vit_conv_small',
                    **{**VIT, 'img_size': 32, 'patch_size': 16})
    common = ['--pretrained', tmp_path / 'vit.pth', '-b', 8]
    res = run(data, tmp_path / 'a', *common, '--epochs', 2)
    log = [json.loads(line) for line in open(tmp_path / 'a' / 'log.jsonl')]
    init_lr = 3.0 * 8 / 256                                                     # ViT default lr 3
    assert [r['lr'] for r in log] == pytest.approx([init_lr, init_lr / 2])     # cosine per epoch
    assert log[0]['protocol'] == "the paper's protocol"
    assert (res['top1'] == log[-1]['val_top1']
            and res['best_top1'] == max(r['val_top1'] for r in log))
    best = torch.load(tmp_path / 'a' / 'model_best.pth', weights_only=True)
    # img size read from checkpoint
    assert best['best_acc1'] == res['best_top1'] and best['img_size'] == 32
    # 1 epoch (lr of epoch 0 does not depend on the total), then resume to 2: the same
    # classifier, bit for bit
    run(data, tmp_path / 'b', *common, '--epochs', 1)
    run(data, tmp_path / 'b', *common, '--epochs', 2, '--resume', 'auto')
    a = torch.load(tmp_path / 'a' / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'checkpoint_last.pth', weights_only=True)
    assert b['epoch'] == 2 and a['state_dict'].keys() == b['state_dict'].keys()
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    ev = run(data, tmp_path / 'c', '-e', '--resume', tmp_path / 'a' / 'checkpoint_last.pth')
    assert ev['top1'] == pytest.approx(res['top1'])


def test_vit_cached_features_and_knn(tmp_path):
    data = make_data(tmp_path / 'data')
    make_pretrained(tmp_path / 'vit.pth', 'vit_tiny', **VIT)
    res = run(data, tmp_path / 'o', '--pretrained', tmp_path / 'vit.pth', '--cache-features',
              '--knn', '--epochs', 30, '-b', 8)
    assert res['knn_top1'] == 100.0  # colour clusters: each val image's neighbours share its class
    log = [json.loads(line) for line in open(tmp_path / 'o' / 'log.jsonl')]
    assert log[0]['protocol'] == tl.NOT_PAPER and log[0]['lr'] == 3.0 * 8 / 256  # ViT default lr 3
    assert log[-1]['val_loss'] < 0.5 * log[0]['val_loss'] and res['top1'] == 100.0


def test_demo_flow_probes_checkpoint_and_random_init(tmp_path, monkeypatch, capsys):
    data = make_data(tmp_path / 'data')
    m = make_pretrained(tmp_path / 'demo.pth', 'vit_tiny', **VIT)
    monkeypatch.setitem(tl.PRESETS['demo'], 'pretrained', str(tmp_path / 'demo.pth'))
    monkeypatch.setitem(tl.PRESETS['demo'], 'data', data)
    args = tl.parse_args(['--preset', 'demo', '--output-dir', str(tmp_path / 'out'), '-j', '0',
                          '--epochs', '90'])
    # the preset, a ViT
    assert args.cache_features and args.knn and args.batch_size == 256 and args.lr == 3.0
    res = tl.main(args)
    assert set(res) == {'trained', 'random_init'} and all('knn_top1' in r for r in res.values())
    trained = torch.load(tmp_path / 'out' / 'checkpoint_last.pth', weights_only=True)
    rand = torch.load(tmp_path / 'out' / 'random_init' / 'checkpoint_last.pth', weights_only=True)
    # --epochs 90 beats the preset's 100, although 90 is the parser's default
    assert trained['epoch'] == rand['epoch'] == 90 and trained['img_size'] == 16
    w = m.base_encoder.state_dict()['blocks.0.attn.qkv.weight']
    assert torch.equal(trained['state_dict']['blocks.0.attn.qkv.weight'], w)
    assert not torch.equal(rand['state_dict']['blocks.0.attn.qkv.weight'], w)
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith('demo linear top-1: ') and out[-1].startswith('demo kNN top-1: ')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Global batch 8 as 2 x 4 under gloo: sharded training with all-reduced head gradients,
    gathered features and summed evaluation give the 1-process numbers."""
    data = make_data(tmp_path / 'data')
    make_pretrained(tmp_path / 'vit.pth', 'vit_tiny', **VIT)
    flags = ['--pretrained', tmp_path / 'vit.pth', '--epochs', 2, '-b', 8, '--knn', '-j', '0']
    one = run(data, tmp_path / 'one', *flags)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': PYTHONPATH}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           f'--master_port={free_port()}',
           os.path.join(ROOT, 'train_linear.py'), data, '--output-dir', tmp_path / 'two', *flags]
    subprocess.run(list(map(str, cmd)), env=env, check=True, capture_output=True, timeout=120)
    a = torch.load(tmp_path / 'one' / 'checkpoint_last.pth', weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'two' / 'checkpoint_last.pth', weights_only=True)['state_dict']
    for k in ('head.weight', 'head.bias'):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    logs = [[json.loads(line) for line in open(tmp_path / d / 'log.jsonl')] for d in ('one', 'two')]
    assert ([r['val_loss'] for r in logs[0]]
            == pytest.approx([r['val_loss'] for r in logs[1]], rel=1e-5))
    assert one['top1'] == logs[1][-1]['val_top1']


def test_one_process_under_torchrun_env_equals_plain_and_ends_its_group(tmp_path, monkeypatch):
    """torchrun's environment with one process: launch.setup() makes a gloo group (gathered
    features, summed evaluation over one rank), the numbers are the plain run's, bit for bit, and
    main destroys the group at the end."""
    data = make_data(tmp_path / 'data')
    make_pretrained(tmp_path / 'vit.pth', 'vit_tiny', **VIT)
    flags = ['--pretrained', tmp_path / 'vit.pth', '--epochs', 2, '-b', 8]
    run(data, tmp_path / 'plain', *flags)
    env = dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(free_port()))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        run(data, tmp_path / 'group', *flags)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    a, b = (torch.load(tmp_path / d / 'checkpoint_last.pth', weights_only=True)['state_dict']
            for d in ('plain', 'group'))
    assert torch.equal(a['head.weight'], b['head.weight'])
    assert torch.equal(a['head.bias'], b['head.bias'])


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(tmp_path):
    data = make_data(tmp_path / 'data', n_train=1, n_val=1)
    make_pretrained(tmp_path / 'r18.pth', 'resnet18')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    ckpt = torch.load(tmp_path / 'r18.pth', weights_only=True)
    del ckpt['arch']
    torch.save(ckpt, tmp_path / 'noarch.pth')
    os.makedirs(tmp_path / 'noval' / 'train')
    cases = [
        # arch named in checkpoint
        (data, '--pretrained', tmp_path / 'r18.pth', '-a', 'vit_small'),
        # weights do not fit
        (data, '--pretrained', tmp_path / 'noarch.pth', '-a', 'resnet34'),
        (data, '--pretrained', tmp_path / 'junk.pth'),
        (data, '--pretrained', tmp_path / 'list.pth'),
        (data, '--pretrained', tmp_path / 'missing.pth'),
        # not a linear checkpoint
        (data, '--resume', tmp_path / 'r18.pth'),
        (tmp_path / 'noval', '--pretrained', tmp_path / 'r18.pth'),
        (tmp_path / 'nodata', '--pretrained', tmp_path / 'r18.pth')]
    for d, *flags in cases:
        with pytest.raises(launch.UserError) as e:
            run(d, tmp_path / 'out', *flags)
        msg = str(e.value)
        assert msg and '\n' not in msg, (flags, msg)
    # no argument and no demo checkpoint: one line that says what to run, exit
    # code != 0, no traceback
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train_linear.py')], cwd=tmp_path,
                       capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': PYTHONPATH}, timeout=60)
    assert p.returncode != 0 and p.stderr.strip().count('\n') == 0
    assert 'python train_pretrain.py' in p.stderr and 'Traceback' not in p.stderr


# ----------------------------------------------------------- the official commands and defaults
def test_official_lincls_commands_parse_unchanged(tmp_path):
    """CONFIG.md's main_lincls.py commands, `python main_lincls.py` -> this script,
    placeholders filled."""
    import shlex
    make_pretrained(tmp_path / 'r50.pth.tar', 'resnet50', official=True)
    # only its arch is read
    make_pretrained(tmp_path / 'vit.pth.tar', 'vit_base', official=True, **VIT)
    for command, expected in (
            (f"--dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 "
             f"--rank 0 --pretrained {tmp_path}/r50.pth.tar /data/imagenet",
             dict(arch='resnet50', lr=0.1)),
            (f"-a vit_base --lr=3 --dist-url 'tcp://localhost:10001' --multiprocessing-distributed "
             f"--world-size 1 --rank 0 --pretrained {tmp_path}/vit.pth.tar /data/imagenet",
             dict(arch='vit_base', lr=3.0))):
        args = tl.parse_args(shlex.split(command))
        assert {k: getattr(args, k) for k in expected} == expected and args.data == '/data/imagenet'
        # the official protocol's settings, fp32 backbone included
        assert (args.epochs, args.batch_size, args.momentum, args.weight_decay, args.dtype) == \
            (90, 1024, 0.9, 0.0, 'fp32')
    assert tl.parse_args(['-e', '-j', '4', '--start-epoch', '3', '--seed', '1', '-p', '5',
                          '/d']).evaluate


def test_corrupt_image_is_one_line(tmp_path):
    data = make_data(tmp_path / 'data')
    make_pretrained(tmp_path / 'vit.pth', 'vit_tiny', **VIT)
    (tmp_path / 'data' / 'val' / 'class1' / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(launch.UserError, match='broken.png') as e:
        run(data, tmp_path / 'o', '--pretrained', tmp_path / 'vit.pth', '--epochs', 1, '-b', 8)
    assert '\n' not in str(e.value)

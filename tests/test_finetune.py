"""train_finetune.py: checkpoint loading and the fresh head, the no-decay groups, MixUp/CutMix
targets and DeiT's loss, layer-wise lr decay and DeiT's lr schedule against hand values, presets,
a few steps end to end, exact resume with repeated augmentation, bad input; for both fine-tuning
and train_linear.py: rank 0 builds the demo data before any rank reads it, torch's errors keep
their traceback; DeiT's repeated-augmentation sampler and timm's RandAugment against their
documented semantics."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets

import augment
import checkpoint
import data
import evaluation
import launch
import moco
import train_finetune as ft
import train_linear as tl
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, stop_grad_conv1=True)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A 3-class ImageFolder (16 px; the class shows in one colour channel) and MoCo
    checkpoints in our layout."""
    tmp = tmp_path_factory.mktemp('ft')
    rng = np.random.default_rng(0)
    for split, n in (('train', 8), ('val', 4)):
        for c in range(3):
            os.makedirs(tmp / 'data' / split / f'c{c}')
            for i in range(n):
                a = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                a[..., c] += 170
                Image.fromarray(a).save(tmp / 'data' / split / f'c{c}' / f'{i}.png')
    torch.manual_seed(0)
    m = moco.build_moco('vit_tiny', dim=16, mlp_dim=32, **VIT_KW)
    torch.save({'state_dict': m.state_dict(), 'arch': 'vit_tiny', 'backbone_kwargs': VIT_KW,
                'epoch': 1}, tmp / 'vit.pth')
    r = moco.build_moco('resnet18', dim=16, mlp_dim=32)
    with torch.no_grad():  # non-trivial BN statistics, so copying them is tested
        for name, b in r.named_buffers():
            if 'running' in name:
                b.uniform_(0.5, 1.5)
    torch.save({'state_dict': r.state_dict(), 'arch': 'resnet18', 'backbone_kwargs': {}},
               tmp / 'r18.pth')
    (tmp / 'notes.txt').write_text('not a checkpoint')
    os.makedirs(tmp / 'no_val')
    os.symlink(tmp / 'data' / 'train', tmp / 'no_val' / 'train')
    # 258 training images: repeated augmentation keeps whole 256s of them
    for split, n in (('train', 86), ('val', 2)):
        for c in range(3):
            os.makedirs(tmp / 'big' / split / f'c{c}')
            for i in range(n):
                a = rng.integers(0, 80, (8, 8, 3)).astype(np.uint8)
                a[..., c] += 170
                Image.fromarray(a).save(tmp / 'big' / split / f'c{c}' / f'{i}.png')
    return tmp


def args_for(files, *extra, data='data'):
    """A short run in fp32 (the CPU default is bf16 where the CPU has it natively): the tests
    compare its numbers with references."""
    return ft.parse_args([str(files / data), '--pretrained', str(files / 'vit.pth'),
                          '-b', '8', '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1',
                          '--output-dir', str(files / 'out'), '--no-repeated-aug',
                          '--dtype', 'fp32', *extra])


def build_model(args, num_classes=3):
    pretrained = checkpoint.read(args.pretrained) if args.pretrained else {}
    return ft.build_model(args, pretrained, num_classes)


# ----------------------------------------------------------------------- loading and the fresh head
@pytest.mark.parametrize('img_size', [16, 32])
def test_vit_backbone_loaded_and_head_fresh(files, img_size):
    args = args_for(files, '--img-size', str(img_size))
    torch.manual_seed(1)
    model, arch, kwargs = build_model(args)
    ckpt = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert arch == 'vit_tiny' and kwargs['num_classes'] == 3 and kwargs['img_size'] == img_size
    for k, v in model.state_dict().items():
        if k.startswith('head.') or k == 'pos_embed':
            continue
        assert torch.equal(v, ckpt['base_encoder.' + k]), k
    # pos_embed: the checkpoint's sin-cos table at 16 px, recomputed for the 8 x 8 grid at 32 px;
    # trainable (DeiT)
    grid = img_size // 4
    expected = vit.build_2d_sincos_pos_embed(grid, grid, 32)[None]
    assert torch.allclose(model.pos_embed, expected, atol=1e-6) and model.pos_embed.requires_grad
    if img_size == 16:
        assert torch.equal(model.pos_embed, ckpt['base_encoder.pos_embed'])
    # patch projection no longer frozen
    assert all(p.requires_grad for n, p in model.named_parameters())
    assert model(torch.randn(2, 3, img_size, img_size)).shape == (2, 3)
    # head: trunc-normal std 0.02, zero bias; not the projector, not vit.py's Xavier (std ~0.24 for
    # 32 -> 3)
    assert model.head.weight.shape == (3, 32) and torch.equal(model.head.bias, torch.zeros(3))
    assert 0.012 < model.head.weight.std().item() < 0.028 and model.head.weight.abs().max() < 0.1


def test_resnet_backbone_loaded_and_fc_default(files):
    args = ft.parse_args([str(files / 'data'), '--pretrained', str(files / 'r18.pth')])
    model, arch, kwargs = build_model(args)
    ckpt = torch.load(files / 'r18.pth', weights_only=True)['state_dict']
    assert arch == 'resnet18'
    n = 0
    for k, v in model.state_dict().items():  # weights and BN buffers
        if not k.startswith('fc.'):
            assert torch.equal(v, ckpt['base_encoder.' + k]), k
            n += 1
    assert n == len([k for k in ckpt
                     if k.startswith('base_encoder.') and not k.startswith('base_encoder.fc.')])
    bound = 1 / math.sqrt(512)  # nn.Linear's default init
    assert model.fc.weight.shape == (3, 512) and model.fc.weight.abs().max() <= bound
    assert model.fc.weight.std() > bound / 3 and model.fc.bias.abs().max() <= bound


def test_random_init_takes_architecture_only(files):
    torch.manual_seed(0)
    model, _, _ = build_model(args_for(files, '--random-init', '--img-size', '16'))
    ckpt = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert len(model.blocks) == 2 and model.num_features == 32
    assert not torch.equal(model.blocks[0].attn.qkv.weight,
                           ckpt['base_encoder.blocks.0.attn.qkv.weight'])


# ------------------------------------------------------------------- parameter groups and schedules
def test_no_weight_decay_groups_exact():
    model = vit.vit_tiny(num_classes=3, embed_dim=32, depth=2, num_heads=2, img_size=16,
                         patch_size=4, pos_embed='learned')
    opt = torch.optim.AdamW(ft.param_groups(model, 0.05))
    decay = {n for g in opt.param_groups if g['weight_decay'] == 0.05 for n in g['names']}
    no_decay = {n for g in opt.param_groups if g['weight_decay'] == 0.0 for n in g['names']}
    block = lambda i, names: {f'blocks.{i}.{n}' for n in names}
    assert decay == {'patch_embed.proj.weight', 'head.weight'} | set().union(*(
        block(i, ['attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight'])
        for i in range(2)))
    assert no_decay == {'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'norm.weight',
                        'norm.bias', 'head.bias'} | set().union(*(
        block(i, ['norm1.weight', 'norm1.bias', 'attn.qkv.bias', 'attn.proj.bias',
                  'norm2.weight', 'norm2.bias', 'mlp.fc1.bias', 'mlp.fc2.bias'])
        for i in range(2)))
    # a frozen tensor (the 'none' position embedding) is in no group
    frozen = vit.vit_tiny(num_classes=3, depth=1, img_size=16, patch_size=4, pos_embed='none')
    assert 'pos_embed' not in {n for g in ft.param_groups(frozen, 0.05) for n in g['names']}
    # plain tensors, not (name, tensor) pairs: torch's named groups need a newer torch than
    # requirements' 2.4
    assert all(isinstance(p, torch.Tensor)
               for g in ft.param_groups(model, 0.05) for p in g['params'])


def test_layer_decay_hand_values():
    model = vit.vit_tiny(num_classes=3, embed_dim=32, depth=2, num_heads=2, img_size=16,
                         patch_size=4)
    opt = torch.optim.AdamW(ft.param_groups(model, 0.05, layer_decay=0.5))
    scale = {n: g['lr_scale'] for g in opt.param_groups for n in g['names']}
    # depth 2: scale = 0.5 ** (3 - layer id); embeddings 0, block i -> i + 1, final norm and head 3
    assert (scale['cls_token'] == scale['patch_embed.proj.weight']
            == scale['patch_embed.proj.bias'] == 0.125)
    assert scale['blocks.0.attn.qkv.weight'] == scale['blocks.0.norm1.bias'] == 0.25
    assert scale['blocks.1.mlp.fc2.weight'] == 0.5
    assert scale['norm.weight'] == scale['head.weight'] == scale['head.bias'] == 1.0
    assert 'pos_embed' not in scale                                            # sin-cos: frozen
    assert (ft.vit_layer_id('blocks.11.attn.qkv.weight', 12) == 12
            and ft.vit_layer_id('head.bias', 12) == 13)


def test_lr_schedule_is_deits_by_hand():
    """timm's CosineLRScheduler as DeiT sets it up, by hand: lr 1e-3, 12 epochs, 4 of them a
    linear warm-up from 1e-6, that is 1e-6 + e (1e-3 - 1e-6) / 4; then a half-cosine to the min
    lr 1e-5 over ALL 12 epochs, 1e-5 + (1e-3 - 1e-5) (1 + cos(pi e / 12)) / 2."""
    def lr(epoch, warmup_epochs=4):
        return ft.lr_at(epoch, lr=1e-3, epochs=12, warmup_epochs=warmup_epochs,
                        warmup_lr=1e-6, min_lr=1e-5)

    hand = {0: 0.000001, 1: 0.00025075, 2: 0.0005005, 3: 0.00075025,
            4: 0.0007525,       # cos(pi/3) = 1/2: the cosine began at epoch 0, 1e-3 never runs
            6: 0.000505,        # cos(pi/2) = 0: halfway between 1e-3 and 1e-5
            8: 0.0002575,       # cos(2pi/3) = -1/2
            11: 0.00001 + 0.00099 * (1 - 0.9659258262890683) / 2,    # cos(pi/12) = 0.96592...
            12: 0.00001}        # the end of the cosine: the min lr
    for epoch, value in hand.items():
        assert math.isclose(lr(epoch), value, rel_tol=1e-12), epoch
    assert math.isclose(lr(0, warmup_epochs=0), 0.001, rel_tol=1e-12)   # no warm-up: lr first
    # the demo (5 epochs) has none: a warm-up epoch would be one of five at 1e-6
    assert ft.DEMO_PRESET['warmup_epochs'] == 0


# ---------------------------------------------------------------------- MixUp / CutMix and the loss
def test_mixup_cutmix_soft_targets_match_images():
    mixer = augment.batch_mixer(0.8, 1.0, num_classes=5)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # neighbours always differ
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        xm, t = mixer(x.clone(), y)
        assert t.shape == (8, 5) and torch.allclose(t.sum(1), torch.ones(8)) and (t >= 0).all()
        lam = t[0, 0].item()  # weight of the image's own label
        # image 0 is mixed with image 7 (label 2); an empty CutMix box gives lam = 1
        assert 0 < lam <= 1 and math.isclose(t[0, 2].item(), 1 - lam, abs_tol=1e-6)
        rolled = x.roll(1, 0)
        if torch.allclose(xm, lam * x + (1 - lam) * rolled, atol=1e-6):       # MixUp: blend by lam
            seen.add('mixup')
        else:  # CutMix: a box from the neighbour
            from_rolled = ((xm == rolled) & (xm != x)).all(1).float().mean().item()
            assert (((xm == x) | (xm == rolled)).all()
                    and math.isclose(from_rolled, 1 - lam, abs_tol=1e-6))
            seen.add('cutmix')
    assert seen == {'mixup', 'cutmix'}  # one or the other per batch
    assert augment.batch_mixer(0.0, 0.0, 5) is None


def test_loss_is_deits_smoothed_soft_target_cross_entropy():
    torch.manual_seed(0)
    logits, C, eps, lam = torch.randn(4, 5), 5, 0.1, 0.3
    y1, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 1, 2])
    # timm's Mixup: smooth each one-hot (off eps/C, on 1 - eps + eps/C), then mix;
    # SoftTargetCrossEntropy
    smooth = lambda y: F.one_hot(y, C).float() * (1 - eps) + eps / C
    deit = (-(lam * smooth(y1) + (1 - lam) * smooth(y2)) * logits.log_softmax(-1)).sum(-1).mean()
    mixed = lam * F.one_hot(y1, C).float() + (1 - lam) * F.one_hot(y2, C).float()
    assert torch.allclose(ft.soft_target_loss(logits, mixed, eps), deit, atol=1e-6)
    hard = (-smooth(y1) * logits.log_softmax(-1)).sum(-1).mean()  # no mixing: plain smoothing
    assert torch.allclose(ft.soft_target_loss(logits, y1, eps), hard, atol=1e-6)


# ----------------------------------------------------------------------------- end to end, resume
def test_few_steps_end_to_end(files, capsys):
    out = files / 'e2e'
    res = ft.main(args_for(files, '--output-dir', str(out), '--model-ema', '--layer-decay', '0.75',
                           '--clip-grad', '1.0'))
    printed = capsys.readouterr().out  # not a terminal: plain lines
    assert 'epoch 1/2 step 1/3: loss ' in printed and 'epoch 2/2 step 3/3: loss ' in printed
    ckpt = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    best = torch.load(out / 'model_best.pth', weights_only=True)
    assert (ckpt['epoch'] == 2 and ckpt['step'] == 6
            and set(best) >= {'state_dict', 'arch', 'backbone_kwargs'})
    model = moco.ARCHS[ckpt['arch']](**ckpt['backbone_kwargs'])
    model.load_state_dict(ckpt['state_dict'])  # strict: bare, timm's key layout
    pre = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert not torch.equal(model.blocks[0].attn.qkv.weight,
                           pre['base_encoder.blocks.0.attn.qkv.weight'])
    # the reported accuracy is that of the saved model on val/ (resize 18 + center crop 16)
    val = datasets.ImageFolder(files / 'data' / 'val', augment.eval_transform(16, bicubic=True))
    stats = evaluation.evaluate(model, DataLoader(val, 5), torch.device('cpu'))
    assert (math.isclose(stats['top1'], res['top1'])
            and math.isclose(stats['loss'], res['loss'], rel_tol=1e-5))
    assert 'ema_top1' in res and ckpt['ema'] is not None
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    steps, epochs = [r for r in rows if 'loss' in r], [r for r in rows if 'val_top1' in r]
    assert len(steps) == 6 and len(epochs) == 2 and all(math.isfinite(r['loss']) for r in steps)
    # one lr an epoch (3 steps each), times each group's lr_scale: 1 warm-up epoch at 1e-6, then
    # the cosine at 1/2 of 2 epochs from 5e-4 x 8/512 = 7.8125e-6 to 1e-5 (a rise: the min lr is
    # above this tiny batch's lr)
    epoch_1 = 1e-5 + (7.8125e-6 - 1e-5) / 2
    assert [r['lr'] for r in steps] == pytest.approx([1e-6] * 3 + [epoch_1] * 3, rel=1e-12)
    groups = ckpt['optimizer']['param_groups']
    assert all(math.isclose(g['lr'], g['lr_scale'] * epoch_1, rel_tol=1e-12) for g in groups)
    # 0.75^(3..0)
    assert sorted({round(g['lr_scale'], 6) for g in groups}) == [0.421875, 0.5625, 0.75, 1.0]


def test_resume_is_exact(files, monkeypatch):
    """With DeiT's repeated augmentation and RandAugment: 258 images -> 256 an epoch,
    2 steps of 128."""
    extra = ('--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.2', '--repeated-aug',
             '-b', '128')
    ft.main(args_for(files, '--output-dir', str(files / 'full'), *extra, data='big'))
    save = checkpoint.save

    def save_and_keep_epoch_1(obj, path):  # a run that "crashes" after epoch 1
        save(obj, path)
        if obj.get('epoch') == 1 and str(path).endswith('checkpoint_last.pth'):
            shutil.copy(path, files / 'epoch1.pth')
    monkeypatch.setattr(checkpoint, 'save', save_and_keep_epoch_1)
    ft.main(args_for(files, '--output-dir', str(files / 'tmp_run'), *extra, data='big'))
    monkeypatch.setattr(checkpoint, 'save', save)
    ft.main(args_for(files, '--output-dir', str(files / 'resumed'),
                     '--resume', str(files / 'epoch1.pth'), *extra, data='big'))
    a = torch.load(files / 'full' / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(files / 'resumed' / 'checkpoint_last.pth', weights_only=True)
    assert a['step'] == b['step'] == 4 and a['args']['repeated_aug']
    for k in a['state_dict']:
        assert torch.equal(a['state_dict'][k], b['state_dict'][k]), k
    for k in a['ema']:
        assert torch.equal(a['ema'][k], b['ema'][k]), k
    sa, sb = a['optimizer']['state'], b['optimizer']['state']
    assert all(torch.equal(sa[i]['exp_avg_sq'], sb[i]['exp_avg_sq']) for i in sa)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('case, message', [
    ('no_val', 'val is not a directory'),
    ('not_checkpoint', 'not a readable checkpoint'),
    ('wrong_arch', 'holds a vit_tiny'),
    ('layer_decay_resnet', 'ViTs only'),
    ('resume_pretraining', 'no checkpoint of train_finetune.py'),
    ('resume_not_checkpoint', 'notes.txt is not a readable checkpoint'),
    ('no_data', 'DATA is required'),
    ('repeated_aug_too_few', 'fewer than its batch of 8 (see --no-repeated-aug)'),
])
def test_bad_input_is_one_line(files, case, message):
    args = {'no_val': [str(files / 'no_val')],
            'not_checkpoint': [str(files / 'data'), '--pretrained', str(files / 'notes.txt')],
            'wrong_arch': [str(files / 'data'), '--pretrained', str(files / 'vit.pth'),
                           '--arch', 'resnet18'],
            'layer_decay_resnet': [str(files / 'data'), '--pretrained', str(files / 'r18.pth'),
                                   '--layer-decay', '0.75'],
            'resume_pretraining': [str(files / 'data'), '--resume', str(files / 'vit.pth')],
            'resume_not_checkpoint': [str(files / 'data'), '--resume', str(files / 'notes.txt')],
            'no_data': ['--pretrained', str(files / 'vit.pth')],
            'repeated_aug_too_few': [str(files / 'data'), '--pretrained',
                                     str(files / 'vit.pth')]}[case]
    args += ['--no-repeated-aug'] if case != 'repeated_aug_too_few' else []
    with pytest.raises(launch.UserError) as e:
        ft.main(ft.parse_args(args + ['-b', '8', '-j', '0', '--output-dir', str(files / 'bad')]))
    assert message in str(e.value) and '\n' not in str(e.value)


# ------------------------------------------------------------- both scripts: torchrun and the exit
SCRIPTS = {'train_linear': tl, 'train_finetune': ft}


class Stop(Exception):
    """Ends a run where the test has seen what it needs."""


@pytest.mark.parametrize('rank', [0, 1])
@pytest.mark.parametrize('script', SCRIPTS)
def test_demo_data_is_built_by_rank_0_before_any_rank_reads(monkeypatch, script, rank):
    """Under torchrun rank 0 builds the demo set, every rank waits at the barrier, then reads:
    a late rank's rebuild (rmtree) can no longer remove files that another one is reading."""
    events = []

    def read(*args):
        events.append('read')
        raise Stop

    monkeypatch.setattr(launch, 'setup', lambda: launch.Run(rank, 2, 0, torch.device('cpu')))
    monkeypatch.setattr(launch, 'barrier', lambda: events.append('barrier'))
    monkeypatch.setattr(data, 'build_demo_dataset', lambda root: events.append('build'))
    monkeypatch.setattr(data, 'build_dataset', read)
    module = SCRIPTS[script]
    with pytest.raises(Stop):
        module.main(module.parse_args([data.DEMO_ROOT, '-a', 'vit_tiny', '-b', '8']))
    built = ['build'] if rank == 0 else []
    assert events == built + ['barrier', 'read']


@pytest.mark.parametrize('error', ['ValueError', 'launch.UserError'])
@pytest.mark.parametrize('script', SCRIPTS)
def test_torch_errors_keep_their_traceback_user_errors_are_one_line(tmp_path, script, error):
    """The script's own exit (`__main__`): a ValueError raised inside main (as torch raises
    them) keeps its traceback; a UserError is one line and exit code 1."""
    path = os.path.join(ROOT, f'{script}.py')
    code = '\n'.join([
        'import runpy, sys',
        'import data, launch',
        'def fail(*args):',
        f'    raise {error}("x")',
        'data.build_dataset = fail',
        f"sys.argv = [{path!r}, 'DATA', '-a', 'vit_tiny', '-j', '0']",
        f"runpy.run_path({path!r}, run_name='__main__')"])
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=120)
    assert p.returncode == 1
    if error == 'ValueError':
        assert 'Traceback' in p.stderr and 'in fail' in p.stderr
        assert p.stderr.strip().splitlines()[-1] == 'ValueError: x'
    else:
        assert p.stderr.strip().splitlines() == ['error: x']


def test_corrupt_image_is_named(files, tmp_path):
    shutil.copytree(files / 'data', tmp_path / 'data')
    (tmp_path / 'data' / 'train' / 'c1' / '3.png').write_bytes(b'not a png')
    with pytest.raises(data.UnreadableImage, match=r'cannot read image .*c1/3\.png'):
        ft.main(args_for(files, '--output-dir', str(tmp_path / 'out'), '--epochs', '1',
                         data=tmp_path / 'data'))


def test_cli_errors_are_one_line(files, tmp_path):
    """No arguments and no demo checkpoint; a flag but no DATA: one line, exit 1, no traceback."""
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'}
    run = lambda *a: subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train_finetune.py'), *a], cwd=tmp_path,
        env=env, capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        'error: no demo checkpoint at output/pretrain/checkpoint_last.pth: '
        'run `python train_pretrain.py` first']
    r = run('--epochs', '3')
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: DATA is required: the image set's root (see --dataset); for the built-in demo run "
        '`python train_finetune.py` alone, or add --preset demo']


# ----------------------------------------------------------------------------- presets and the demo
def test_presets_are_defaults_and_flags_win():
    demo = ft.parse_args([])  # no arguments: the demo
    assert demo.preset == 'demo' and demo.epochs == 5 and demo.data == data.DEMO_ROOT
    assert demo.pretrained == ft.DEMO_CHECKPOINT and not demo.repeated_aug
    # a flag equal to the parser's default still wins over the preset (it used to be overridden)
    assert ft.parse_args(['--preset', 'demo', '--epochs', '150']).epochs == 150
    assert ft.parse_args(['--preset', 'demo', '--mixup', '0.8']).mixup == 0.8
    plain = ft.parse_args(['/data'])  # DeiT's ImageNet recipe
    assert plain.preset is None and (
        (plain.epochs, plain.batch_size, plain.lr, plain.weight_decay) == (150, 1024, 5e-4, 0.05))
    assert ((plain.mixup, plain.cutmix, plain.reprob, plain.drop_path, plain.smoothing)
            == (0.8, 1.0, 0.25, 0.1, 0.1))
    # DeiT's schedule: 5 warm-up epochs from 1e-6, the cosine to 1e-5; the dtype: the hardware's
    assert (plain.warmup_epochs, plain.warmup_lr, plain.min_lr) == (5, 1e-6, 1e-5)
    assert plain.dtype is None
    assert (plain.ra_num_ops, plain.ra_magnitude, plain.ra_mstd) == (2, 9, 0.5)
    assert plain.repeated_aug and plain.interpolation == 'bicubic' and plain.crop_min == 0.08
    assert not ft.parse_args(['/data', '--no-repeated-aug']).repeated_aug


def test_demo_flow_fine_tunes_checkpoint_and_random_init(files, tmp_path, capsys):
    """--preset demo: the checkpoint, then the same budget from random init; the preset fills what
    the user did not give (here: no MixUp/CutMix/erasing), the user's flags win (--epochs, -b)."""
    args = ft.parse_args([str(files / 'data'), '--preset', 'demo', '--pretrained',
                          str(files / 'vit.pth'), '--output-dir', str(tmp_path / 'out'),
                          '-j', '0', '--epochs', '1', '-b', '8'])
    res = ft.main(args)
    assert set(res) == {'pretrained', 'random_init'} and all('top1' in r for r in res.values())
    tuned = torch.load(tmp_path / 'out' / 'checkpoint_last.pth', weights_only=True)
    rand = torch.load(tmp_path / 'out' / 'random_init' / 'checkpoint_last.pth', weights_only=True)
    assert tuned['epoch'] == rand['epoch'] == 1 and tuned['args']['batch_size'] == 8
    assert ((tuned['args']['mixup'], tuned['args']['cutmix'], tuned['args']['reprob'])
            == (0.0, 0.0, 0.0))
    assert tuned['args']['lr'] == rand['args']['lr'] == ft.DEMO_PRESET['lr']
    assert tuned['args']['pretrained'] == rand['args']['pretrained'] == str(files / 'vit.pth')
    assert not tuned['args']['random_init'] and rand['args']['random_init']
    assert capsys.readouterr().out.splitlines()[-1].startswith('demo fine-tuned top-1: ')


# --------------------------------------------------------------------- DeiT's repeated augmentation
def deit_ra_indices(perm, world, rank):
    """DeiT's RASampler restated: each index 3 times in a row, padded to a multiple of the
    processes, dealt out in turn; each process keeps floor(N // 256 * 256 / world) of its share."""
    n = len(perm)
    idx = [i for i in perm for _ in range(3)]
    total = math.ceil(n * 3 / world) * world
    idx += idx[:total - len(idx)]
    return idx[rank:total:world][:int(math.floor(n // 256 * 256 / world))]


@pytest.mark.parametrize('n, world', [(1000, 1), (1000, 8), (600, 2), (771, 3)])
def test_repeated_aug_sampler_is_deits(n, world):
    seen = {}
    for epoch in (0, 1):
        g = torch.Generator()
        g.manual_seed(5 + epoch)                                     # shuffled by seed + epoch
        perm = torch.randperm(n, generator=g).tolist()
        shares = []
        for rank in range(world):
            s = data.RepeatedAugSampler(range(n), world, rank, seed=5)
            s.set_epoch(epoch)
            shares.append(list(s))
            assert shares[-1] == deit_ra_indices(perm, world, rank) and len(s) == len(shares[-1])
            assert list(s) == shares[-1]  # a pure function of (seed, epoch, rank)
        seen[epoch] = shares
        counts = np.bincount(np.concatenate(shares), minlength=n)
        assert sum(map(len, shares)) == n // 256 * 256 // world * world and counts.max() == 3
        # the 3 copies of an image go to 3 processes in turn (1 process: all 3, in a row)
        most = max(np.bincount(share).max() for share in shares)
        assert most == math.ceil(3 / world) and (world > 1 or shares[0][:3] == [perm[0]] * 3)
    assert seen[0] != seen[1]
    # ImageNet on 8 GPUs: DeiT's epoch of 1,281,024 images, 160,128 a process
    assert len(data.RepeatedAugSampler(range(1281167), 8, 0)) == 160128


# ------------------------------------------------------------------------- timm's RandAugment, inc1
TIMM_INC1 = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
             'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
             'BrightnessIncreasing', 'SharpnessIncreasing',
             'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
# timm's auto_augment.py, magnitude m -> the op's argument at m = 0, 5, 9, 10 (None: no argument),
# signed?
TIMM_LEVELS = {
    'AutoContrast': (None, False), 'Equalize': (None, False), 'Invert': (None, False),
    'Rotate': ((0, 15, 27, 30), True),                                # degrees
    'PosterizeIncreasing': ((4, 2, 1, 0), False),                     # bits kept
    'SolarizeIncreasing': ((256, 128, 26, 0), False),                 # threshold
    'SolarizeAdd': ((0, 55, 99, 110), False),                         # added to values below 128
    **{name: ((0, 0.45, 0.81, 0.9), True) for name in TIMM_INC1[7:11]},   # enhance factor 1 +- this
    'ShearX': ((0, 0.15, 0.27, 0.3), True), 'ShearY': ((0, 0.15, 0.27, 0.3), True),
    'TranslateXRel': ((0, 0.225, 0.405, 0.45), True),
    'TranslateYRel': ((0, 0.225, 0.405, 0.45), True),
}
FILL = (124, 116, 104)  # ImageNet's mean colour, as timm


def rgb(a):
    return Image.fromarray(np.asarray(a, dtype=np.uint8))


@pytest.mark.parametrize('name', TIMM_INC1)
def test_rand_augment_op_ranges_are_timms(name):
    assert list(augment.RAND_OPS) == TIMM_INC1
    level, signed, op = augment.RAND_OPS[name]
    expected, expected_signed = TIMM_LEVELS[name]
    assert signed == expected_signed
    if expected is None:
        assert level is None
        return
    for m, v in zip((0, 5, 9, 10), expected):
        assert math.isclose(level(m), v, abs_tol=1e-9), (m, level(m), v)
    # increasing ops: the image moves further from the original as m grows, from no change at m = 0
    # (posterize keeps 4 bits at m = 0, the least it changes); geometry: more of a white image is
    # filled
    img = rgb(np.random.default_rng(1).integers(0, 256, (16, 16, 3)))
    if name in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'):
        img = rgb(np.full((16, 16, 3), 255))
    for sign in (1, -1) if signed else (1,):
        change = [np.abs(np.asarray(op(img, sign * level(m), FILL, Image.BICUBIC), dtype=float)
                         - np.asarray(img, dtype=float)).mean() for m in (0, 2.5, 5, 7.5, 10)]
        assert (all(a <= b + 1e-9 for a, b in zip(change, change[1:]))
                and change[-1] > change[0]), change
        assert name == 'PosterizeIncreasing' or change[0] == 0


def test_rand_augment_ops_do_what_timm_documents():
    ops = {name: op for name, (_, _, op) in augment.RAND_OPS.items()}
    call = lambda name, img, v, rs=Image.BICUBIC: (
        np.asarray(ops[name](img, v, FILL, rs)).astype(int))
    values = np.array([[[0, 100, 127], [128, 182, 255]]])                # (1, 2, 3)
    img = rgb(values)
    assert (call('PosterizeIncreasing', img, 2) == values & 0b11000000).all()
    assert (call('PosterizeIncreasing', img, 0) == 0).all()  # m = 10: nothing kept, as timm
    assert (call('SolarizeIncreasing', img, 128)
            == np.where(values >= 128, 255 - values, values)).all()
    assert (call('SolarizeIncreasing', img, 256) == values).all()
    assert (call('SolarizeAdd', img, 110)
            == np.where(values < 128, np.minimum(values + 110, 255), values)).all()
    assert (call('Invert', img, None) == 255 - values).all()
    assert (call('AutoContrast', rgb(np.full((2, 2, 3), 50) + np.eye(2)[..., None] * 100), None)
            == np.eye(2)[..., None] * 255).all()  # [50, 150] stretched to [0, 255]
    assert (call('BrightnessIncreasing', rgb(np.full((2, 2, 3), 100)), 0.45) == 145).all()
    assert (call('BrightnessIncreasing', rgb(np.full((2, 2, 3), 100)), -0.45) == 55).all()
    gray = rgb(np.full((2, 2, 3), 77))
    assert (call('ColorIncreasing', gray, 0.9) == 77).all()            # colour: no change on grey
    # geometry, with nearest sampling to see the mapping: output (x, y) reads input (x + v y, y) ...
    grid = np.arange(8 * 8 * 3).reshape(8, 8, 3) % 256
    sheared = call('ShearX', rgb(grid), 0.5, Image.NEAREST)
    assert (sheared[0] == grid[0]).all() and (sheared[2, :-1] == grid[2, 1:]).all()
    assert (sheared[6, -3:] == FILL).all()  # outside the image: the mean colour
    moved = call('TranslateXRel', rgb(grid), 0.25, Image.NEAREST)       # 0.25 of 8 px = 2 px
    assert (moved[:, :-2] == grid[:, 2:]).all() and (moved[:, -2:] == FILL).all()
    moved = call('TranslateYRel', rgb(grid), -0.25, Image.NEAREST)
    assert (moved[2:] == grid[:-2]).all() and (moved[:2] == FILL).all()
    turned = call('Rotate', rgb(grid), 45)
    assert (turned[0, 0] == FILL).all()  # counter-clockwise about the centre
    assert (call('Rotate', rgb(grid), 90) == np.rot90(grid)).all()


def test_rand_augment_draws_probability_and_magnitude_noise():
    inverse = {'Rotate': 30, 'ShearX': 0.3, 'ShearY': 0.3,
               'TranslateXRel': 0.45, 'TranslateYRel': 0.45,
               **{name: 0.9 for name in TIMM_INC1[7:11]}}                # |v| = m / 10 * range
    def draws(ra, n):
        return [ra.draw() for _ in range(n)]

    torch.manual_seed(0)
    one = draws(augment.RandAugment(num_ops=1), 4000)
    assert abs(sum(map(len, one)) / 4000 - 0.5) < 0.03  # each chosen op applies with p = 0.5
    torch.manual_seed(0)
    two = draws(augment.RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5), 6000)
    applied = [op for d in two for op in d]
    assert abs(len(applied) / 6000 - 1.0) < 0.04
    counts = np.array([sum(name == n for n, _ in applied) for name in TIMM_INC1])
    # uniform
    assert counts.min() > 0.7 * len(applied) / 15 and counts.max() < 1.3 * len(applied) / 15
    # drawn with replacement, as timm
    assert sum(len(d) == 2 and d[0][0] == d[1][0] for d in two) > 0
    m = np.array([abs(v) / inverse[n] * 10 for n, v in applied if n in inverse])
    signs = np.array([v > 0 for n, v in applied if n in inverse])
    assert abs(m.mean() - 9) < 0.05 and abs(m.std() - 0.5) < 0.05 and 0 <= m.min() and m.max() <= 10
    assert abs(signs.mean() - 0.5) < 0.04
    torch.manual_seed(0)  # clipped at 10, timm's upper bound
    top = [abs(v) for d in draws(augment.RandAugment(magnitude=10), 3000)
           for n, v in d if n == 'Rotate']
    assert max(top) == 30 and 0.35 < np.mean([t == 30 for t in top]) < 0.65
    torch.manual_seed(0)                                              # no noise: exactly m
    fixed = [abs(v) for d in draws(augment.RandAugment(magnitude_std=0), 1000)
             for n, v in d if n == 'Rotate']
    assert fixed and all(math.isclose(f, 27) for f in fixed)


def test_rand_augment_is_seeded_by_torch_and_composed_as_deit():
    img = rgb(np.random.default_rng(2).integers(0, 256, (24, 24, 3)))
    ra = augment.RandAugment()
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(np.stack([np.asarray(ra(img)) for _ in range(8)]))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])
    deit = {type(t).__name__: t for t in augment.finetune_transform(16).transforms}
    assert deit['RandomResizedCrop'].scale == (0.08, 1.0) and deit['RandomErasing'].p == 0.25
    assert deit['RandomResizedCrop'].interpolation == augment.InterpolationMode.BICUBIC
    ra = deit['RandAugment']
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob, ra.fill) == (2, 9, 0.5, 0.5, FILL)
    transfer = {type(t).__name__: t for t in augment.finetune_transform(
        16, 0.05, 0, reprob=0, bicubic=False).transforms}
    assert 'RandAugment' not in transfer and 'RandomErasing' not in transfer
    assert transfer['RandomResizedCrop'].scale == (0.05, 1.0)
    assert transfer['RandomResizedCrop'].interpolation == augment.InterpolationMode.BILINEAR

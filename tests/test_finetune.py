"""train_finetune.py: checkpoint loading and the fresh head, the no-decay groups, MixUp/CutMix targets and DeiT's
loss, layer-wise lr decay and the schedule against hand values, a few steps end to end, exact resume, bad input."""
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

import moco
import train_finetune as ft
import vit
from train_linear import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, stop_grad_conv1=True)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A 3-class ImageFolder (16 px; the class shows in one colour channel) and MoCo checkpoints in our layout."""
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
    torch.save({'state_dict': m.state_dict(), 'arch': 'vit_tiny', 'backbone_kwargs': VIT_KW, 'epoch': 1},
               tmp / 'vit.pth')
    r = moco.build_moco('resnet18', dim=16, mlp_dim=32)
    with torch.no_grad():                                  # non-trivial BN statistics, so copying them is tested
        for name, b in r.named_buffers():
            if 'running' in name:
                b.uniform_(0.5, 1.5)
    torch.save({'state_dict': r.state_dict(), 'arch': 'resnet18', 'backbone_kwargs': {}}, tmp / 'r18.pth')
    (tmp / 'notes.txt').write_text('not a checkpoint')
    os.makedirs(tmp / 'no_val')
    os.symlink(tmp / 'data' / 'train', tmp / 'no_val' / 'train')
    return tmp


def args_for(files, *extra):
    return ft.get_args_parser().parse_args([str(files / 'data'), '--pretrained', str(files / 'vit.pth'), '-b', '8',
                                            '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1',
                                            '--output-dir', str(files / 'out'), *extra])


# ----------------------------------------------------------------------------- loading and the fresh head
@pytest.mark.parametrize('img_size', [16, 32])
def test_vit_backbone_loaded_and_head_fresh(files, img_size):
    args = args_for(files, '--img-size', str(img_size))
    torch.manual_seed(1)
    model, arch, kwargs = ft.build_model(args, num_classes=3)
    ckpt = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert arch == 'vit_tiny' and kwargs['num_classes'] == 3 and kwargs['img_size'] == img_size
    for k, v in model.state_dict().items():
        if k.startswith('head.') or k == 'pos_embed':
            continue
        assert torch.equal(v, ckpt['base_encoder.' + k]), k
    # pos_embed: the checkpoint's sin-cos table at 16 px, recomputed for the 8 x 8 grid at 32 px; trainable (DeiT)
    grid = img_size // 4
    expected = vit.build_2d_sincos_pos_embed(grid, grid, 32)[None]
    assert torch.allclose(model.pos_embed, expected, atol=1e-6) and model.pos_embed.requires_grad
    if img_size == 16:
        assert torch.equal(model.pos_embed, ckpt['base_encoder.pos_embed'])
    assert all(p.requires_grad for n, p in model.named_parameters())          # patch projection no longer frozen
    assert model(torch.randn(2, 3, img_size, img_size)).shape == (2, 3)
    # head: trunc-normal std 0.02, zero bias; not the projector, not vit.py's Xavier (std ~0.24 for 32 -> 3)
    assert model.head.weight.shape == (3, 32) and torch.equal(model.head.bias, torch.zeros(3))
    assert 0.012 < model.head.weight.std().item() < 0.028 and model.head.weight.abs().max() < 0.1


def test_resnet_backbone_loaded_and_fc_default(files):
    args = ft.get_args_parser().parse_args([str(files / 'data'), '--pretrained', str(files / 'r18.pth')])
    model, arch, kwargs = ft.build_model(args, num_classes=3)
    ckpt = torch.load(files / 'r18.pth', weights_only=True)['state_dict']
    assert arch == 'resnet18'
    n = 0
    for k, v in model.state_dict().items():                                   # weights and BN buffers
        if not k.startswith('fc.'):
            assert torch.equal(v, ckpt['base_encoder.' + k]), k
            n += 1
    assert n == len([k for k in ckpt if k.startswith('base_encoder.') and not k.startswith('base_encoder.fc.')])
    bound = 1 / math.sqrt(512)                                                # nn.Linear's default init
    assert model.fc.weight.shape == (3, 512) and model.fc.weight.abs().max() <= bound
    assert model.fc.weight.std() > bound / 3 and model.fc.bias.abs().max() <= bound


def test_random_init_takes_architecture_only(files):
    torch.manual_seed(0)
    model, _, _ = ft.build_model(args_for(files, '--random-init'), num_classes=3)
    ckpt = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert len(model.blocks) == 2 and model.num_features == 32
    assert not torch.equal(model.blocks[0].attn.qkv.weight, ckpt['base_encoder.blocks.0.attn.qkv.weight'])


# ----------------------------------------------------------------------------- parameter groups and schedules
def test_no_weight_decay_groups_exact():
    model = vit.vit_tiny(num_classes=3, embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4,
                         pos_embed='learned')
    opt = torch.optim.AdamW(ft.param_groups(model, 0.05))
    decay = {n for g in opt.param_groups if g['weight_decay'] == 0.05 for n in g['param_names']}
    no_decay = {n for g in opt.param_groups if g['weight_decay'] == 0.0 for n in g['param_names']}
    block = lambda i, names: {f'blocks.{i}.{n}' for n in names}
    assert decay == {'patch_embed.proj.weight', 'head.weight'} | set().union(*(block(i, [
        'attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight']) for i in range(2)))
    assert no_decay == {'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
                        'head.bias'} | set().union(*(block(i, [
                            'norm1.weight', 'norm1.bias', 'attn.qkv.bias', 'attn.proj.bias', 'norm2.weight',
                            'norm2.bias', 'mlp.fc1.bias', 'mlp.fc2.bias']) for i in range(2)))
    # a frozen tensor (the 'none' position embedding) is in no group
    frozen = vit.vit_tiny(num_classes=3, depth=1, img_size=16, patch_size=4, pos_embed='none')
    assert 'pos_embed' not in {n for g in ft.param_groups(frozen, 0.05) for n, _ in g['params']}


def test_layer_decay_hand_values():
    model = vit.vit_tiny(num_classes=3, embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4)
    opt = torch.optim.AdamW(ft.param_groups(model, 0.05, layer_decay=0.5))
    scale = {n: g['lr_scale'] for g in opt.param_groups for n in g['param_names']}
    # depth 2: scale = 0.5 ** (3 - layer id); embeddings 0, block i -> i + 1, final norm and head 3
    assert scale['cls_token'] == scale['patch_embed.proj.weight'] == scale['patch_embed.proj.bias'] == 0.125
    assert scale['blocks.0.attn.qkv.weight'] == scale['blocks.0.norm1.bias'] == 0.25
    assert scale['blocks.1.mlp.fc2.weight'] == 0.5
    assert scale['norm.weight'] == scale['head.weight'] == scale['head.bias'] == 1.0
    assert 'pos_embed' not in scale                                            # sin-cos: frozen
    assert ft.vit_layer_id('blocks.11.attn.qkv.weight', 12) == 12 and ft.vit_layer_id('head.bias', 12) == 13


def test_lr_schedule_hand_values():
    lr = lambda s: ft.lr_at(s, total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr(0) == 0.0 and lr(5) == 0.5 and lr(10) == 1.0
    assert math.isclose(lr(60), 0.1 + 0.9 * 0.5) and math.isclose(lr(110), 0.1)
    assert math.isclose(lr(35), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


# ----------------------------------------------------------------------------- MixUp / CutMix and the loss
def test_mixup_cutmix_soft_targets_match_images():
    mixer = ft.batch_mixer(0.8, 1.0, num_classes=5)
    x = torch.rand(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])                                # neighbours always differ
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        xm, t = mixer(x.clone(), y)
        assert t.shape == (8, 5) and torch.allclose(t.sum(1), torch.ones(8)) and (t >= 0).all()
        lam = t[0, 0].item()                                                  # weight of the image's own label
        # image 0 is mixed with image 7 (label 2); an empty CutMix box gives lam = 1
        assert 0 < lam <= 1 and math.isclose(t[0, 2].item(), 1 - lam, abs_tol=1e-6)
        rolled = x.roll(1, 0)
        if torch.allclose(xm, lam * x + (1 - lam) * rolled, atol=1e-6):       # MixUp: blend by lam
            seen.add('mixup')
        else:                                                                 # CutMix: a box from the neighbour
            from_rolled = ((xm == rolled) & (xm != x)).all(1).float().mean().item()
            assert ((xm == x) | (xm == rolled)).all() and math.isclose(from_rolled, 1 - lam, abs_tol=1e-6)
            seen.add('cutmix')
    assert seen == {'mixup', 'cutmix'}                                         # one or the other per batch
    assert ft.batch_mixer(0.0, 0.0, 5) is None


def test_loss_is_deits_smoothed_soft_target_cross_entropy():
    torch.manual_seed(0)
    logits, C, eps, lam = torch.randn(4, 5), 5, 0.1, 0.3
    y1, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 1, 2])
    # timm's Mixup: smooth each one-hot (off eps/C, on 1 - eps + eps/C), then mix; SoftTargetCrossEntropy
    smooth = lambda y: F.one_hot(y, C).float() * (1 - eps) + eps / C
    deit = (-(lam * smooth(y1) + (1 - lam) * smooth(y2)) * logits.log_softmax(-1)).sum(-1).mean()
    mixed = lam * F.one_hot(y1, C).float() + (1 - lam) * F.one_hot(y2, C).float()
    assert torch.allclose(ft.soft_target_loss(logits, mixed, eps), deit, atol=1e-6)
    hard = (-smooth(y1) * logits.log_softmax(-1)).sum(-1).mean()               # no mixing: plain smoothing
    assert torch.allclose(ft.soft_target_loss(logits, y1, eps), hard, atol=1e-6)


# ----------------------------------------------------------------------------- end to end, resume
def test_few_steps_end_to_end(files):
    out = files / 'e2e'
    res = ft.main(args_for(files, '--output-dir', str(out), '--model-ema', '--layer-decay', '0.75',
                           '--clip-grad', '1.0'))
    ckpt = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    best = torch.load(out / 'model_best.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and ckpt['step'] == 6 and set(best) >= {'state_dict', 'arch', 'backbone_kwargs'}
    model = moco.build_backbone(ckpt['arch'], **ckpt['backbone_kwargs'])
    model.load_state_dict(ckpt['state_dict'])                                 # strict: bare, timm's key layout
    pre = torch.load(files / 'vit.pth', weights_only=True)['state_dict']
    assert not torch.equal(model.blocks[0].attn.qkv.weight, pre['base_encoder.blocks.0.attn.qkv.weight'])
    # the reported accuracy is that of the saved model on val/ (resize 18 + center crop 16)
    val = datasets.ImageFolder(files / 'data' / 'val', ft.eval_transform(16))
    stats = evaluate(model, DataLoader(val, 5), torch.device('cpu'))
    assert math.isclose(stats['top1'], res['top1']) and math.isclose(stats['loss'], res['loss'], rel_tol=1e-5)
    assert 'ema_top1' in res and ckpt['ema'] is not None
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    steps, epochs = [r for r in rows if 'loss' in r], [r for r in rows if 'val_top1' in r]
    assert len(steps) == 6 and len(epochs) == 2 and all(math.isfinite(r['loss']) for r in steps)
    # the schedule is applied every iteration (3 steps per epoch, 1 warmup epoch), times each group's lr_scale
    lr = 5e-4 * 8 / 512
    assert [r['lr'] for r in steps] == [ft.lr_at(i, 6, 3, lr, 1e-5) for i in range(6)]
    groups = ckpt['optimizer']['param_groups']
    assert all(math.isclose(g['lr'], g['lr_scale'] * ft.lr_at(5, 6, 3, lr, 1e-5)) for g in groups)
    assert sorted({round(g['lr_scale'], 6) for g in groups}) == [0.421875, 0.5625, 0.75, 1.0]  # 0.75^(3..0)


def test_resume_is_exact(files, monkeypatch):
    extra = ('--model-ema', '--model-ema-decay', '0.9', '--drop-path', '0.2')
    ft.main(args_for(files, '--output-dir', str(files / 'full'), *extra))
    save = ft.save_atomic

    def save_and_keep_epoch_1(obj, path):                                    # a run that "crashes" after epoch 1
        save(obj, path)
        if obj.get('epoch') == 1 and str(path).endswith('checkpoint_last.pth'):
            shutil.copy(path, files / 'epoch1.pth')
    monkeypatch.setattr(ft, 'save_atomic', save_and_keep_epoch_1)
    ft.main(args_for(files, '--output-dir', str(files / 'tmp_run'), *extra))
    monkeypatch.setattr(ft, 'save_atomic', save)
    ft.main(args_for(files, '--output-dir', str(files / 'resumed'), '--resume', str(files / 'epoch1.pth'), *extra))
    a = torch.load(files / 'full' / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(files / 'resumed' / 'checkpoint_last.pth', weights_only=True)
    assert a['step'] == b['step'] == 6
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
])
def test_bad_input_is_one_line(files, case, message):
    args = {'no_val': [str(files / 'no_val')],
            'not_checkpoint': [str(files / 'data'), '--pretrained', str(files / 'notes.txt')],
            'wrong_arch': [str(files / 'data'), '--pretrained', str(files / 'vit.pth'), '--arch', 'resnet18'],
            'layer_decay_resnet': [str(files / 'data'), '--pretrained', str(files / 'r18.pth'), '--layer-decay',
                                   '0.75'],
            'resume_pretraining': [str(files / 'data'), '--resume', str(files / 'vit.pth')]}[case]
    with pytest.raises(SystemExit) as e:
        ft.main(ft.get_args_parser().parse_args(args + ['-b', '8', '-j', '0', '--output-dir', str(files / 'bad')]))
    assert str(e.value).startswith('error: ') and message in str(e.value) and '\n' not in str(e.value)


def test_cli_without_demo_checkpoint(tmp_path):
    """No arguments and no demo checkpoint: one line naming the command to run first, exit != 0, no traceback."""
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_finetune.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [
        'error: no demo checkpoint at output/pretrain/checkpoint_last.pth: run `python train_pretrain.py` first']


def test_demo_flow_fine_tunes_checkpoint_and_random_init(files, tmp_path, monkeypatch, capsys):
    """No DATA and no --pretrained: the demo checkpoint, then the same budget from random init; the preset fills
    what the user did not give (here: no MixUp/CutMix/erasing), the user's flags win (--epochs, -b)."""
    monkeypatch.setattr(ft, 'DEMO_CHECKPOINT', str(files / 'vit.pth'))
    monkeypatch.setattr(ft, 'build_demo_dataset', lambda: str(files / 'data'))
    args = ft.get_args_parser().parse_args(['--output-dir', str(tmp_path / 'out'), '-j', '0', '--epochs', '1',
                                            '-b', '8'])
    res = ft.main(args)
    assert set(res) == {'pretrained', 'random_init'} and all('top1' in r for r in res.values())
    tuned = torch.load(tmp_path / 'out' / 'checkpoint_last.pth', weights_only=True)
    rand = torch.load(tmp_path / 'out' / 'random_init' / 'checkpoint_last.pth', weights_only=True)
    assert tuned['epoch'] == rand['epoch'] == 1 and tuned['args']['batch_size'] == 8
    assert (tuned['args']['mixup'], tuned['args']['cutmix'], tuned['args']['reprob']) == (0.0, 0.0, 0.0)
    assert tuned['args']['lr'] == rand['args']['lr'] == ft.DEMO_PRESET['lr']
    assert tuned['args']['pretrained'] == rand['args']['pretrained'] == str(files / 'vit.pth')
    assert not tuned['args']['random_init'] and rand['args']['random_init']
    assert capsys.readouterr().out.splitlines()[-1].startswith('demo fine-tuned top-1: ')

"""Tests of train_pretrain.py: schedules, recipes, augmentations, kNN, end-to-end steps on tiny generated data
(ViT and ResNet), 2-process gloo DDP, exact resume, bad input and the NaN stop."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import moco  # noqa: E402
import train_pretrain as tp  # noqa: E402


# ----------------------------------------------------------------------------- tiny data
@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """2 classes x 8 train images and x 4 val images of 16 px: a bright square or a bright disc on noise."""
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
                Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(root / split / name / f'{i}.png')
    return str(root)


def args_for(data, out, *extra):
    """A tiny run: batch 8 of 16-px images -> 2 steps per epoch."""
    return tp.get_args_parser().parse_args(
        [data, '--output-dir', str(out), '--knn-data', data, '-b', '8', '--epochs', '1', '--img-size', '16',
         '--moco-dim', '16', '--moco-mlp-dim', '32', '--workers', '0', '--print-freq', '1', *extra])


VIT = ('--preset', 'demo', '--lr', '1e-3', '--warmup-epochs', '1')       # the demo's small ViT, patch 4
RESNET = ('--arch', 'resnet18', '--lr', '0.6')


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def log_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


# ----------------------------------------------------------------------------- schedules and recipes
def test_learning_rate_schedule():
    f = lambda e: tp.adjust_learning_rate(e, 1.0, 10, 100)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)                          # linear warmup
    assert f(10) == pytest.approx(1.0)
    assert f(32.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))   # a quarter into the cosine
    assert f(55) == pytest.approx(0.5)
    assert f(100) == pytest.approx(0.0, abs=1e-12)


def test_momentum_schedule():
    f = lambda e: tp.adjust_moco_momentum(e, 0.99, 100)  # noqa: E731
    assert f(0) == pytest.approx(0.99)
    assert f(50) == pytest.approx(0.995)
    assert f(100) == pytest.approx(1.0)
    assert f(25) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)


def recipe(*argv):
    args = tp.get_args_parser().parse_args(['/data', *argv])
    kwargs = tp.fill_defaults(args)
    return args, kwargs


def test_recipes():
    args, kwargs = recipe('--arch', 'vit_base')
    assert (args.optimizer, args.lr, args.weight_decay, args.epochs, args.warmup_epochs, args.moco_t,
            args.batch_size, args.crop_min, args.moco_m, args.moco_mlp_dim, args.moco_dim) == \
        ('adamw', 1.5e-4, 0.1, 300, 40, 0.2, 4096, 0.08, 0.99, 4096, 256)
    assert args.moco_m_cos and kwargs == {'img_size': 224, 'stop_grad_conv1': True}
    args, kwargs = recipe('-a', 'resnet50')
    assert (args.optimizer, args.lr, args.weight_decay, args.moco_m, args.moco_t, args.warmup_epochs,
            args.crop_min, args.batch_size, args.epochs) == ('lars', 0.6, 1e-6, 0.99, 1.0, 10, 0.2, 4096, 100)
    assert args.moco_m_cos and kwargs == {}
    args, _ = recipe('-a', 'resnet50', '--epochs', '300')
    assert (args.lr, args.weight_decay, args.moco_m) == (0.3, 1e-6, 0.99)
    args, _ = recipe('-a', 'resnet50', '--epochs', '1000')
    assert (args.lr, args.weight_decay, args.moco_m) == (0.3, 1.5e-6, 0.996)
    # flags the user gives win over the recipe, including switching a recipe's boolean off
    args, kwargs = recipe('-a', 'vit_small', '--lr', '1e-3', '--no-moco-m-cos', '--no-stop-grad-conv1',
                          '--optimizer', 'lamb', '--patch-size', '8', '--img-size', '64')
    assert (args.lr, args.moco_m_cos, args.optimizer) == (1e-3, False, 'lamb')
    assert kwargs == {'img_size': 64, 'stop_grad_conv1': False, 'patch_size': 8}


def test_augmentations():
    aug1, aug2 = tp.pretrain_transforms(224, 0.08)
    for aug, blur_p, solarize_p in ((aug1, 1.0, None), (aug2, 0.1, 0.2)):
        t = {type(op).__name__: op for op in aug.transforms}
        assert tuple(t['RandomResizedCrop'].size) == (224, 224) and t['RandomResizedCrop'].scale == (0.08, 1.0)
        jitter, blur = [op for op in aug.transforms if type(op).__name__ == 'RandomApply']
        cj = jitter.transforms[0]
        assert jitter.p == 0.8 and (cj.brightness, cj.contrast, cj.saturation, cj.hue) == \
            ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert t['RandomGrayscale'].p == 0.2
        assert blur.p == blur_p and isinstance(blur.transforms[0], tp.GaussianBlur)
        assert blur.transforms[0].sigma == (0.1, 2.0) and blur.transforms[0].scale == 1.0
        if solarize_p is None:
            assert 'RandomSolarize' not in t
        else:
            assert t['RandomSolarize'].p == solarize_p and t['RandomSolarize'].threshold == 128
        assert t['RandomHorizontalFlip'].p == 0.5
        assert tuple(t['Normalize'].mean) == tp.IMAGENET_MEAN and tuple(t['Normalize'].std) == tp.IMAGENET_STD
    small = tp.pretrain_transforms(32, 0.2)[0].transforms[3].transforms[0]
    assert small.scale == 32 / 224                                    # the same blur relative to the crop
    x = tp.TwoCrops(aug1, aug2)(Image.new('RGB', (300, 200), (255, 0, 0)))
    assert [v.shape for v in x] == [(3, 224, 224)] * 2 and x[0].dtype == torch.float32


def test_blur_is_pils_gaussian_with_sigma_from_torch_rng():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(3)
    sigma = torch.empty(()).uniform_(0.1, 2.0).item()
    torch.manual_seed(3)
    out = tp.GaussianBlur((0.1, 2.0))(img)
    assert out.size == img.size and 0.1 <= sigma <= 2.0
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    half = tp.GaussianBlur((1.0, 1.0), scale=0.5)(img)               # scale multiplies sigma
    assert np.array_equal(np.asarray(half), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=0.5))))


def test_knn_predict_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[3.0, 0.0]])                         # cosine 1, 0, 0.6, -1 with the four
    scores = tp.knn_predict(train, labels, query, num_classes=3, k=2, T=0.5)
    assert torch.allclose(scores, torch.tensor([[math.exp(2.0), math.exp(1.2), 0.0]]))


def test_demo_dataset_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, 'DEMO_TRAIN', 2)
    monkeypatch.setattr(tp, 'DEMO_VAL', 1)
    root = tp.build_demo_dataset(str(tmp_path / 'demo'))
    assert sorted(os.listdir(os.path.join(root, 'train'))) == sorted(tp.DEMO_CLASSES)
    assert len(os.listdir(os.path.join(root, 'val', 'star'))) == 1
    first = open(os.path.join(root, 'train', 'star', '0001.png'), 'rb').read()
    assert tp.build_demo_dataset(root) == root                 # found: not generated again
    again = tp.build_demo_dataset(str(tmp_path / 'again'))
    assert open(os.path.join(again, 'train', 'star', '0001.png'), 'rb').read() == first


def test_demo_images_carry_no_colour_cue():
    """Black and white only (grey at anti-aliased edges), both ways round in every class: the colours can
    neither classify an image nor tell it from the others, so what contrastive learning finds is shape."""
    for name in tp.DEMO_CLASSES:
        backgrounds = set()
        for seed in range(12):
            img = np.asarray(tp._demo_image(name, seed)).astype(int)
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()   # grey levels
            counts = np.bincount(img[..., 0].ravel(), minlength=256)
            assert counts[0] + counts[255] > 0.7 * img[..., 0].size and counts[0] > 0 and counts[255] > 0
            backgrounds.add(int(img[0, 0, 0]))                 # a corner: no shape reaches it
        assert backgrounds == {0, 255}, name


# ----------------------------------------------------------------------------- end to end
def check_run(out, iters, lr, warmup, epochs):
    """The checkpoint loads with weights_only and the log's lr / m follow the schedules step by step."""
    ckpt = load(os.path.join(out, 'checkpoint_last.pth'))
    assert ckpt['epoch'] == epochs and ckpt['step'] == epochs * iters
    rows = [r for r in log_rows(out) if 'loss' in r]
    assert [r['step'] for r in rows] == list(range(epochs * iters))
    for r in rows:
        e = r['step'] / iters
        assert r['lr'] == pytest.approx(tp.adjust_learning_rate(e, lr, warmup, epochs))
        assert r['m'] == pytest.approx(tp.adjust_moco_momentum(e, ckpt['args']['moco_m'], epochs))
        assert math.isfinite(r['loss']) and r['grad_last'] > 0
    return ckpt, rows


def test_two_steps_vit(data, tmp_path):
    tp.main(args_for(data, tmp_path, '--stop-grad-conv1', *VIT))
    ckpt, rows = check_run(str(tmp_path), 2, 1e-3 * 8 / 256, 1, 1)
    assert all(r['grad_first'] is None for r in rows)          # frozen patch projection: no gradient
    torch.manual_seed(0)                                       # main's seed: the same initial weights
    init = moco.build_moco('vit_tiny', 16, 32, 0.2, **ckpt['backbone_kwargs']).state_dict()
    sd = ckpt['state_dict']
    assert torch.equal(sd['base_encoder.patch_embed.proj.weight'], init['base_encoder.patch_embed.proj.weight'])
    assert not torch.equal(sd['base_encoder.blocks.0.attn.qkv.weight'], init['base_encoder.blocks.0.attn.qkv.weight'])
    model = moco.build_moco(ckpt['arch'], 16, 32, **ckpt['backbone_kwargs'])
    model.load_state_dict(sd)                                  # bare, official layout: loads strictly
    assert ckpt['args']['optimizer'] == 'adamw' and ckpt['scaler'] is None


def test_two_steps_resnet(data, tmp_path):
    tp.main(args_for(data, tmp_path, *RESNET))
    ckpt, rows = check_run(str(tmp_path), 2, 0.6 * 8 / 256, 10, 1)
    assert all(r['grad_first'] > 0 for r in rows)
    assert ckpt['arch'] == 'resnet18' and 'base_encoder.fc.0.weight' in ckpt['state_dict']
    assert all('mu' in s for s in ckpt['optimizer']['state'].values())     # LARS state


def test_exact_resume(data, tmp_path):
    """2 epochs in one run == 1 epoch, resume, 1 epoch: bit-identical weights and optimizer state."""
    common = ('--epochs', '2', '--workers', '1', *VIT)
    tp.main(args_for(data, tmp_path / 'a', '--save-every', '1', *common))
    tp.main(args_for(data, tmp_path / 'b', '--resume', str(tmp_path / 'a' / 'checkpoint_0001.pth'), *common))
    a, b = load(tmp_path / 'a' / 'checkpoint_last.pth'), load(tmp_path / 'b' / 'checkpoint_last.pth')
    assert a['epoch'] == b['epoch'] == 2
    for k, v in a['state_dict'].items():
        assert torch.equal(v, b['state_dict'][k]), k
    for i, s in a['optimizer']['state'].items():
        assert all(torch.equal(v, b['optimizer']['state'][i][n]) for n, v in s.items())
    one = load(tmp_path / 'a' / 'checkpoint_0001.pth')
    assert not torch.equal(one['state_dict']['predictor.0.weight'], a['state_dict']['predictor.0.weight'])


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


CHILD = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_pretrain as tp
data, out = sys.argv[2], sys.argv[3]
run_epoch = tp.train_one_epoch
def train_one_epoch(model, raw_model, *a, **k):      # keep every rank's weights after the epoch
    run_epoch(model, raw_model, *a, **k)
    params = {n: p.detach() for n, p in raw_model.named_parameters()}
    torch.save(params, f'{out}/rank{dist.get_rank()}.pth')
    # the gathered features of a sharded loader equal one process's features of the whole set, in order
    ds = tp.image_folder(data + '/val', tp.eval_transform(16))
    f, l = tp.extract_features(raw_model.base_encoder, tp.make_loader(ds, 3, dist.get_rank(), 2, 0, False, False, 0),
                               torch.device('cpu'))
    ref, ref_l = tp.extract_features(raw_model.base_encoder, torch.utils.data.DataLoader(ds, 5), torch.device('cpu'))
    torch.save({'equal': torch.allclose(f, ref, atol=1e-5) and torch.equal(l, ref_l)}, f'{out}/gather{dist.get_rank()}.pth')
tp.train_one_epoch = train_one_epoch
tp.main(tp.get_args_parser().parse_args(sys.argv[4:]))
'''


def test_two_process_gloo(data, tmp_path):
    script = tmp_path / 'child.py'
    script.write_text(CHILD)
    args = [data, '--output-dir', str(tmp_path), '--knn-data', data, '-b', '8', '--epochs', '1', '--img-size',
            '16', '--moco-dim', '16', '--moco-mlp-dim', '32', '--workers', '0', *VIT]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        f'--master_port={free_port()}', str(script), ROOT, data, str(tmp_path), *args],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # DDP averages the gradients: every parameter is the same in both processes. (BN running statistics are
    # per process on CPU, where there is no SyncBatchNorm; DDP broadcasts rank 0's at each forward.)
    w0, w1 = load(tmp_path / 'rank0.pth'), load(tmp_path / 'rank1.pth')
    assert len(w0) > 50 and all(torch.equal(v, w1[k]) for k, v in w0.items())
    assert load(tmp_path / 'gather0.pth')['equal'] and load(tmp_path / 'gather1.pth')['equal']
    ckpt = load(tmp_path / 'checkpoint_last.pth')
    assert ckpt['step'] == 2 and ckpt['args']['batch_size'] == 8     # 8 = 2 processes x 4
    assert not torch.equal(ckpt['state_dict']['predictor.0.weight'],
                           moco.build_moco('vit_tiny', 16, 32, 0.2, **ckpt['backbone_kwargs']).state_dict()['predictor.0.weight'])


# ----------------------------------------------------------------------------- faults and bad input
def fails(args, match):
    with pytest.raises(SystemExit) as e:
        tp.main(args)
    msg = str(e.value.code)
    assert msg.startswith('error: ') and '\n' not in msg and match in msg, msg
    return msg


def test_bad_data(data, tmp_path):
    fails(args_for(str(tmp_path / 'nowhere'), tmp_path / 'o', *VIT), 'does not exist')
    (tmp_path / 'empty').mkdir()
    fails(args_for(str(tmp_path / 'empty'), tmp_path / 'o', *VIT), 'train')
    (tmp_path / 'empty' / 'train' / 'cls').mkdir(parents=True)
    fails(args_for(str(tmp_path / 'empty'), tmp_path / 'o', *VIT), 'no images')
    fails(args_for(data, tmp_path / 'o', '-b', '64', *VIT), 'fewer than one batch')
    import shutil
    other = tmp_path / 'other'                                 # kNN labels index the class lists: they must agree
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
    fails(args_for(str(bad), tmp_path / 'o', '--workers', '1', *VIT), 'broken.png')   # raised in a worker
    fails(args_for(str(bad), tmp_path / 'o', *VIT), 'broken.png')


def test_bad_arch_optimizer_batch(data, tmp_path, monkeypatch):
    fails(args_for(data, tmp_path, '--arch', 'vit_gigantic'), 'vit_gigantic')
    fails(args_for(data, tmp_path, '--arch', 'resnet18', '--optimizer', 'sgd'), 'sgd')
    monkeypatch.setattr(tp, 'init_distributed', lambda: (0, 3, 0, torch.device('cpu')))
    fails(args_for(data, tmp_path, *VIT), 'not divisible by 3')


def test_resume_from_non_checkpoint(data, tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'notes.txt'), *VIT), 'not a checkpoint')
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'other.pth')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'other.pth'), *VIT), 'not a MoCo v3 checkpoint')
    fails(args_for(data, tmp_path, '--resume', str(tmp_path / 'missing.pth'), *VIT), 'no checkpoint')


def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_pretrain.py'), str(tmp_path / 'nowhere')],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [f'error: data folder {tmp_path / "nowhere"} does not exist']


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
    assert all(torch.equal(v, kept['state_dict'][k]) and v.isfinite().all() for k, v in last['state_dict'].items())

"""Transfer learning (official transfer/README.md): data.build_dataset on tiny copies of CIFAR-10,
CIFAR-100, Flowers102 and Oxford-IIIT Pets in their real file formats, written here; the class
counts and split sizes; two fine-tuning steps on each; the official recipes as presets; one-line
errors for a missing root or scipy."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augment
import data
import launch
import moco
import train_finetune as ft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, stop_grad_conv1=True)
RNG = np.random.default_rng(0)


def pixels(n):
    return RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_cifar(root, name):
    """CIFAR's python pickles: batches of {'data': (N, 3072) uint8 in CHW order, 'labels'}
    and the meta file."""
    def dump(path, obj):
        with open(path, 'wb') as f:
            pickle.dump(obj, f)
    if name == 'cifar10':  # 5 training batches of 8, a test batch of 10
        folder, key, meta, names = (root / 'cifar-10-batches-py', 'labels', 'batches.meta',
                                    'label_names')
        splits = {**{f'data_batch_{i}': 8 for i in range(1, 6)}, 'test_batch': 10}
    else:
        folder, key, meta, names = (root / 'cifar-100-python', 'fine_labels', 'meta',
                                    'fine_label_names')
        splits = {'train': 8, 'test': 6}
    folder.mkdir()
    dump(folder / meta, {names: [f'class{i}' for i in range(10 if name == 'cifar10' else 100)]})
    for split, n in splits.items():
        dump(folder / split, {'data': pixels(n).transpose(0, 3, 1, 2).reshape(n, -1),
                              key: RNG.integers(0, 10, n).tolist()})


def write_flowers(root):
    """Flowers102: jpg/image_00001.jpg ..., imagelabels.mat (labels 1-102),
    setid.mat (trnid, valid, tstid)."""
    from scipy.io import savemat
    folder = root / 'flowers-102'
    (folder / 'jpg').mkdir(parents=True)
    for i, a in enumerate(pixels(13), 1):
        Image.fromarray(a).save(folder / 'jpg' / f'image_{i:05d}.jpg')
    savemat(folder / 'imagelabels.mat',
            {'labels': np.array([[1, 2, 3, 102, 5, 6, 7, 8, 9, 10, 11, 12, 13]])})
    savemat(folder / 'setid.mat', {'trnid': np.array([[1, 2, 3, 4]]),
                                   'valid': np.array([[5, 6, 7, 8]]),
                                   'tstid': np.array([[9, 10, 11, 12, 13]])})


def write_pets(root):
    """Oxford-IIIT Pets: images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt:
    'image class species breed'."""
    folder = root / 'oxford-iiit-pet'
    (folder / 'images').mkdir(parents=True)
    (folder / 'annotations').mkdir()
    for split, offset in (('trainval', 0), ('test', 100)):
        lines = []
        for c in range(37):                                   # one image of each of the 37 breeds
            image_id = f'breed_{c:02d}_{offset + c}'
            Image.fromarray(pixels(1)[0]).save(folder / 'images' / f'{image_id}.jpg')
            lines.append(f'{image_id} {c + 1} {1 if c < 12 else 2} {c % 25 + 1}\n')
        (folder / 'annotations' / f'{split}.txt').write_text(''.join(lines))


WRITERS = {'cifar10': lambda r: write_cifar(r, 'cifar10'),
           'cifar100': lambda r: write_cifar(r, 'cifar100'),
           'flowers102': write_flowers, 'pets': write_pets}
# dataset -> (classes, train images, val images) of the tiny copies
SIZES = {'cifar10': (10, 40, 10), 'cifar100': (100, 8, 6), 'flowers102': (102, 8, 5),
         'pets': (37, 37, 37)}


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('transfer')
    torch.manual_seed(0)
    m = moco.build_moco('vit_tiny', dim=16, mlp_dim=32, **VIT_KW)
    torch.save({'state_dict': m.state_dict(), 'arch': 'vit_tiny', 'backbone_kwargs': VIT_KW},
               tmp / 'vit.pth')
    for name, write in WRITERS.items():
        if name == 'flowers102' and not has_scipy():
            continue
        (tmp / name).mkdir()
        write(tmp / name)
    return tmp


def has_scipy():
    try:
        import scipy.io  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks CIFAR's and Flowers' files against the md5 of the real ones;
    the tiny copies differ."""
    monkeypatch.setattr(torchvision.datasets.utils, 'check_md5', lambda *args, **kwargs: True)


def needs(name):
    if name == 'flowers102' and not has_scipy():
        pytest.skip('scipy is needed to write and read the .mat files of Flowers102')


@pytest.mark.parametrize('name', list(SIZES))
def test_build_dataset_reads_the_real_layout(roots, no_md5, name):
    needs(name)
    classes, n_train, n_val = SIZES[name]
    tf = augment.eval_transform(16)
    train = data.build_dataset(name, roots / name, 'train', tf)
    val = data.build_dataset(name, roots / name, 'val', tf)
    assert (len(train.classes), len(train), len(val)) == (classes, n_train, n_val)
    assert train.classes == val.classes and all(isinstance(c, str) for c in train.classes)
    image, label = train[0]
    assert image.shape == (3, 16, 16) and 0 <= label < classes
    if name == 'flowers102':  # train: the official train + val lists; labels 1-102 -> 0-101
        assert [train[i][1] for i in range(8)] == [0, 1, 2, 101, 4, 5, 6, 7] and val[0][1] == 8
    if name == 'pets':
        assert train.classes[3] == 'Breed 03' and [val[i][1] for i in range(37)] == list(range(37))


@pytest.mark.parametrize('name', list(SIZES))
def test_missing_root_is_one_line(tmp_path, name):
    with pytest.raises(ValueError) as e:
        data.build_dataset(name, tmp_path, 'train', None)
    msg = str(e.value)
    assert msg.startswith(f'no {tmp_path}/') and "expected torchvision's" in msg and '\n' not in msg


def test_corrupted_files_and_missing_scipy_are_one_line(roots, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r'cifar10 files missing or corrupted .*expected') as e:
        # the tiny copy fails the md5 check
        data.build_dataset('cifar10', roots / 'cifar10', 'train', None)
    assert '\n' not in str(e.value)
    (tmp_path / 'flowers-102' / 'jpg').mkdir(parents=True)                 # the layout is there ...
    (tmp_path / 'flowers-102' / 'imagelabels.mat').touch()
    (tmp_path / 'flowers-102' / 'setid.mat').touch()
    monkeypatch.setitem(sys.modules, 'scipy', None)  # ... but scipy is not installed
    monkeypatch.setitem(sys.modules, 'scipy.io', None)
    with pytest.raises(ValueError, match=r'^reading Flowers102 needs scipy .*pip install scipy$'):
        data.build_dataset('flowers102', tmp_path, 'val', None)


def run(roots, tmp_path, name, *extra):
    out = tmp_path / name
    args = ft.parse_args([str(roots / name), '--preset', name,
                          '--pretrained', str(roots / 'vit.pth'), '-j', '0', '--epochs', '1',
                          '-p', '1', '--output-dir', str(out), *extra])
    res = ft.main(args)
    return res, torch.load(out / 'checkpoint_last.pth', weights_only=True), out


@pytest.mark.parametrize('name, batch', [('cifar100', 4), ('flowers102', 4), ('pets', 16)])
def test_two_fine_tuning_steps(roots, no_md5, tmp_path, name, batch):
    needs(name)
    res, ckpt, out = run(roots, tmp_path, name, '-b', str(batch))
    classes, _, n_val = SIZES[name]
    assert ckpt['step'] == 2 and ckpt['backbone_kwargs']['num_classes'] == classes
    assert (ckpt['state_dict']['head.weight'].shape == (classes, 32)
            and len(ckpt['classes']) == classes)
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert ([r['step'] for r in rows if 'loss' in r] == [1, 2]
            and all(np.isfinite(r['loss']) for r in rows if 'loss' in r))
    # whole images right
    assert 0 <= res['top1'] <= 100 and round(res['top1'] * n_val / 100, 6) % 1 == 0


def test_cifar10_preset_is_the_official_recipe(roots, no_md5, tmp_path):
    """`--dataset cifar10 --preset cifar10 --pretrained CKPT ROOT`: the official command's values;
    then a run with `--epochs 1 -b 16` on top, which win."""
    args = ft.parse_args(['--dataset', 'cifar10', '--preset', 'cifar10', '--pretrained', 'CKPT',
                          'ROOT'])
    recipe = {k: getattr(args, k) for k in ('batch_size', 'lr', 'weight_decay', 'epochs',
                                            'warmup_epochs', 'repeated_aug', 'reprob', 'drop_path',
                                            'mixup', 'cutmix')}
    assert recipe == dict(batch_size=1024, lr=3e-4, weight_decay=0.1, epochs=100, warmup_epochs=3,
                          repeated_aug=False, reprob=0.0, drop_path=0.1, mixup=0.8, cutmix=1.0)
    assert ((args.dataset, args.data, args.pretrained, args.smoothing)
            == ('cifar10', 'ROOT', 'CKPT', 0.1))
    # the views of the official transfer/datasets.py: crop 0.05-1 + flip, bilinear; resize 256/224,
    # crop
    assert (args.crop_min, args.ra_num_ops, args.interpolation) == (0.05, 0, 'bilinear')
    args = ft.parse_args([str(roots / 'cifar10'), '--dataset', 'cifar10', '--preset', 'cifar10',
                          '--pretrained', str(roots / 'vit.pth'), '--epochs', '1', '-b', '16',
                          '-j', '0'])
    args.img_size = 16
    one_process = launch.Run(rank=0, world_size=1, local_rank=0, device=torch.device('cpu'))
    train, val, loader, _ = ft.data_loaders(args, one_process)
    views = {type(t).__name__: t for t in train.transform.transforms}
    assert set(views) == {'RandomResizedCrop', 'RandomHorizontalFlip', 'PILToTensor', 'ToDtype',
                          'Normalize'}
    assert views['RandomResizedCrop'].scale == (0.05, 1.0)
    assert views['RandomResizedCrop'].interpolation == augment.InterpolationMode.BILINEAR
    assert val.transform.transforms[0].size == [18] and len(loader) == 2  # 16 * 256 / 224; 40 // 16
    # without the warm-up, epoch 0 runs at the actual lr: DeiT's lr x batch / 512
    _, ckpt, out = run(roots, tmp_path, 'cifar10', '--dataset', 'cifar10', '-b', '16',
                       '--warmup-epochs', '0')
    config = json.loads((out / 'config.json').read_text())
    assert ((config['epochs'], config['batch_size'], config['weight_decay'], config['mixup'])
            == (1, 16, 0.1, 0.8))
    assert config['arch'] == 'vit_tiny' and config['img_size'] == 16   # resolved: the checkpoint's
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    # 2 steps, 1 epoch
    assert [r['lr'] for r in rows] == pytest.approx([3e-4 * 16 / 512] * 3, rel=1e-12)
    assert ckpt['step'] == 2


def test_transfer_presets_table():
    """The four official commands of transfer/README.md (flowers: wd 0.3, no MixUp/CutMix; pets: no
    drop path, MixUp 0.8 only; CIFAR-100: MixUp 0.5), all 100 epochs at 8 x 128 with lr 3e-4, 3
    warmup epochs."""
    table = {name: (a.weight_decay, a.drop_path, a.mixup, a.cutmix, a.reprob) for name in SIZES
             for a in [ft.parse_args(['--preset', name, 'ROOT'])]}
    assert table == {'cifar10': (0.1, 0.1, 0.8, 1.0, 0.0), 'cifar100': (0.1, 0.1, 0.5, 1.0, 0.0),
                     'flowers102': (0.3, 0.1, 0.0, 0.0, 0.0), 'pets': (0.1, 0.0, 0.8, 0.0, 0.0)}
    for name in SIZES:
        a = ft.parse_args(['--preset', name, 'ROOT'])
        assert (a.dataset, a.batch_size, a.lr, a.epochs, a.warmup_epochs, a.repeated_aug) == \
            (name, 1024, 3e-4, 100, 3, False)
        # DeiT's defaults, as the official commands: the cosine ends at 1e-5, 1.7% of the
        # actual lr 3e-4 x 1024/512
        assert (a.warmup_lr, a.min_lr) == (1e-6, 1e-5) and a.min_lr < a.lr * 1024 / 512


def test_cli_missing_root_is_one_line(tmp_path):
    env = {**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_finetune.py'),
                        '--preset', 'cifar10', str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: no {tmp_path}/cifar-10-batches-py/data_batch_1: "
        "expected torchvision's CIFAR-10 layout "
        '(cifar-10-python.tar.gz unpacked in ROOT)']

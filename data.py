"""Image sets for MoCo v3: reading them, the built-in demo set, and the per-process loaders.

  * ImageNet layout (DATA/train/<class>/<image>, DATA/val/<class>/<image>), read with torchvision's
    ImageFolder; an unreadable image or a missing folder is reported in one line naming it
    (`UnreadableImage`, a launch.UserError);
  * the built-in demo set: 10 shapes drawn in black and white, generated once on disk with fixed
    seeds, so the demo and the tests need no download;
  * `make_loader`: every process reads its own shard (DistributedSampler, also for one process: one
    code path).
Augmentations live in augment.py. Bad input raises launch.UserError: the scripts print its one line.
"""
import math
import os
import random
import shutil

import torch
import torchvision
from PIL import Image, ImageDraw

from launch import UserError


# ----------------------------------------------------------------------------- reading images
class UnreadableImage(UserError):
    """A file of the image set that PIL cannot decode. Raised inside a loader worker it reaches the
    main process with the worker's traceback in its message (launch.error_line prints the last
    line); only the process that read it knows, so every rank reports it."""
    every_rank = True


def load_image(path):
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:
        raise UnreadableImage(f'cannot read image {path}: {str(e).splitlines()[0]}') from None


def image_folder(root, transform):
    """torchvision's ImageFolder (classes = sorted sub-folders, labels = their indices); one-line
    errors."""
    if not os.path.isdir(root):
        raise UserError(f'no folder {root} (expected the ImageNet layout: '
                        f'DATA/train/<class>/<image>)')
    try:
        return torchvision.datasets.ImageFolder(root, transform, loader=load_image)
    except FileNotFoundError as e:
        raise UserError(f'no images in {root}: {e}') from None


def check_same_classes(train_set, val_set, root):
    """Labels are indices into each set's sorted class list: train/ and val/ must list the same
    classes."""
    if val_set.classes != train_set.classes:
        raise UserError(f'the classes of {root}/val differ from those of {root}/train')


# ------------------------------------------------------------------------- labelled sets by name
# The paper's transfer sets (official transfer/README.md), read from a local ROOT with torchvision's
# classes in torchvision's layout, never downloaded: name -> (what ROOT must hold, the layout in
# words).
TRANSFER_LAYOUTS = {
    'cifar10': (['cifar-10-batches-py/' + f for f in
                 ('data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5',
                  'test_batch', 'batches.meta')],
                "torchvision's CIFAR-10 layout (cifar-10-python.tar.gz unpacked in ROOT)"),
    'cifar100': (['cifar-100-python/' + f for f in ('train', 'test', 'meta')],
                 "torchvision's CIFAR-100 layout (cifar-100-python.tar.gz unpacked in ROOT)"),
    'flowers102': (['flowers-102/jpg', 'flowers-102/imagelabels.mat', 'flowers-102/setid.mat'],
                   "torchvision's Flowers102 layout: ROOT/flowers-102/ with jpg/, imagelabels.mat, "
                   "setid.mat"),
    'pets': (['oxford-iiit-pet/images', 'oxford-iiit-pet/annotations/trainval.txt',
              'oxford-iiit-pet/annotations/test.txt'],
             "torchvision's OxfordIIITPet layout: ROOT/oxford-iiit-pet/ with images/ and "
             "annotations/"),
}
DATASETS = ('folder', *TRANSFER_LAYOUTS)


def build_dataset(name, root, split, transform):
    """A labelled image set with `.classes` (class names; labels index them). split: 'train' or
    'val'.
      folder      the ImageNet layout, root/<split>/<class>/<image>;
      cifar10/100 train: the 50,000 training images; val: the 10,000 test images;
      flowers102  train: the official 'train' + 'val' lists (1,020 + 1,020: the official transfer
      code's
                  trnid + valid); val: the 6,149 test images;
      pets        train: the 3,680 'trainval' images; val: the 3,669 'test' images (as the official
      code)."""
    if name not in DATASETS:
        raise UserError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')
    if split not in ('train', 'val'):
        raise UserError(f"unknown split {split!r}: 'train' or 'val'")
    if name == 'folder':
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f'{path} is not a directory: expected the ImageNet layout, '
                            f'ROOT/{split}/<class>/<image>')
        return image_folder(path, transform)
    paths, layout = TRANSFER_LAYOUTS[name]
    for p in paths:
        if not os.path.exists(os.path.join(root, p)):
            raise UserError(f'no {os.path.join(root, p)}: expected {layout}')
    train, sets = split == 'train', torchvision.datasets
    try:
        if name in ('cifar10', 'cifar100'):
            cifar = sets.CIFAR10 if name == 'cifar10' else sets.CIFAR100
            dataset = cifar(root, train, transform, download=False)
        elif name == 'pets':
            dataset = sets.OxfordIIITPet(root, 'trainval' if train else 'test', transform=transform,
                                         download=False)
        else:
            try:
                import scipy.io  # noqa: F401 (torchvision reads the .mat files with it)
            except ImportError:
                raise UserError('reading Flowers102 needs scipy (torchvision reads its .mat files '
                                'with it): pip install scipy') from None
            splits = ['train', 'val'] if train else ['test']
            dataset = torch.utils.data.ConcatDataset(
                [sets.Flowers102(root, s, transform, download=False) for s in splits])
            # the names: torchvision >= 0.21 has them; before, the labels' numbers
            numbers = [str(i) for i in range(1, 103)]
            dataset.classes = list(getattr(sets.Flowers102, 'classes', numbers))
    except RuntimeError as e:  # torchvision: a file is missing or its md5 is wrong
        raise UserError(f'{root}: {name} files missing or corrupted ({e}); '
                        f'expected {layout}') from None
    return dataset


class RepeatedAugSampler(torch.utils.data.Sampler):
    """DeiT's repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): every epoch shuffles the
    indices by (seed, epoch), repeats each `repeats` times in a row and deals the list out to the
    processes in turn, so the copies of an image go to different processes, each of which augments
    its own. Each process keeps its first (N // 256 * 256) // world_size indices: an epoch as long
    as one pass over the N images (rounded down to whole 256s, as DeiT), in which each image drawn
    appears `repeats` times. A pure function of (seed, epoch, rank): a resumed run sees what an
    uninterrupted one would have seen."""

    def __init__(self, dataset, world_size, rank, seed=0, repeats=3):
        self.n, self.world_size, self.rank = len(dataset), world_size, rank
        self.seed, self.repeats = seed, repeats
        self.num_samples = self.n // 256 * 256 // world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        # (N * repeats,)
        order = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)
        # DeiT pads the list to a multiple of world_size; the kept head never reaches the padding
        return iter(order[self.rank::self.world_size][:self.num_samples].tolist())

    def __len__(self):
        return self.num_samples


def make_loader(dataset, batch_size, rank, world_size, workers, train, pin_memory, seed):
    """This process's loader: a DistributedSampler shard (shuffled by (seed, epoch) for training,
    which drops the ragged end; dataset order for evaluation). batch_size is per process."""
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=train,
                                                  seed=seed, drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=train)


# ------------------------------------------------------------------------- the built-in demo set
DEMO_ROOT = 'data/moco_demo'
DEMO_VERSION = 'moco-demo-v3'
DEMO_SIZE, DEMO_TRAIN, DEMO_VAL = 32, 500, 100          # px; images per class in train/ and in val/
# Shape and background are black and white, in either order, independently of the class. Contrastive
# learning tells an image from the others of its batch by whatever its two crops share and the
# augmentations leave intact; colour is such a cue (ColorJitter's hue 0.1 barely moves a saturated
# colour), so it must carry no identity: with fully random colours the model matched crops by colour
# and kNN stayed near chance; with a 5-colour palette kNN gained only 9 points in 8 epochs; with two
# tones every image shares its colours with half of the batch, and shape is what identifies it (+29
# in 8).
DEMO_PALETTE = ((0, 0, 0), (255, 255, 255))
_STAR = [((1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
          -(1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
DEMO_SHAPES = {                                          # outlines in units of the shape's radius
    'triangle': [(0, -1), (0.87, 0.5), (-0.87, 0.5)],
    'square': [(-.7, -.7), (.7, -.7), (.7, .7), (-.7, .7)],
    'star': _STAR,
    'arrow': [(-1, -.35), (.1, -.35), (.1, -1), (1, 0), (.1, 1), (.1, .35), (-1, .35)],
    'cross': [(-.35, -1), (.35, -1), (.35, -.35), (1, -.35), (1, .35), (.35, .35), (.35, 1),
              (-.35, 1), (-.35, .35), (-1, .35), (-1, -.35), (-.35, -.35)],
    'ell': [(-1, -1), (-.3, -1), (-.3, .3), (1, .3), (1, 1), (-1, 1)],
    'tee': [(-1, -1), (1, -1), (1, -.3), (.35, -.3), (.35, 1), (-.35, 1), (-.35, -.3), (-1, -.3)],
    'circle': None, 'ring': None, 'crescent': None}      # these three are drawn as discs
DEMO_CLASSES = tuple(DEMO_SHAPES)


def _demo_image(name, seed):
    """One image: a shape of a random size, position and rotation, in palette colours."""
    rng, ss = random.Random(seed), 4  # draw 4x larger, then downsample: smooth edges
    bg, fg = rng.sample(DEMO_PALETTE, 2)
    img = Image.new('RGB', (DEMO_SIZE * ss,) * 2, bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * DEMO_SIZE * ss
    x, y = (rng.uniform(r, DEMO_SIZE * ss - r) for _ in range(2))
    a = rng.uniform(0, 2 * math.pi)

    def disc(dx, dy, rr, colour):
        draw.ellipse((x + dx - rr, y + dy - rr, x + dx + rr, y + dy + rr), colour)

    if DEMO_SHAPES[name] is not None:                    # rotate by a, scale by r, move to (x, y)
        draw.polygon([(x + r * (u * math.cos(a) - v * math.sin(a)),
                       y + r * (u * math.sin(a) + v * math.cos(a)))
                      for u, v in DEMO_SHAPES[name]], fg)
    else:
        disc(0, 0, r, fg)
        if name == 'ring':
            disc(0, 0, 0.55 * r, bg)
        elif name == 'crescent':                         # a disc with a shifted disc cut out
            disc(0.45 * r * math.cos(a), 0.45 * r * math.sin(a), 0.8 * r, bg)
    return img.resize((DEMO_SIZE, DEMO_SIZE), Image.BOX)


def build_demo_dataset(root=DEMO_ROOT, train=DEMO_TRAIN, val=DEMO_VAL):
    """Generate the built-in set once (fixed seeds: every run and machine gets the same images) in
    the ImageNet layout: root/train/<class>/*.png for pretraining, root/val/<class>/*.png held out;
    train and val images per class (fewer: the first of the same images, for smoke tests).
    Returns root."""
    marker, version = os.path.join(root, 'VERSION'), DEMO_VERSION
    if (train, val) != (DEMO_TRAIN, DEMO_VAL):
        version += f' {train}+{val}'
    if os.path.isfile(marker) and open(marker).read().strip() == version:
        return root
    if os.path.exists(root) and not os.path.isfile(marker):
        raise UserError(f'{root} exists but is not a built-in demo dataset (no {marker}); '
                        f'move it away')
    tmp = f'{root.rstrip(os.sep)}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n, offset in (('train', train, 0), ('val', val, 10 ** 6)):
        for label, name in enumerate(DEMO_CLASSES):
            os.makedirs(os.path.join(tmp, split, name))
            for i in range(n):
                image = _demo_image(name, offset + label * 10 ** 5 + i)
                image.save(os.path.join(tmp, split, name, f'{i:04d}.png'))
    with open(os.path.join(tmp, 'VERSION'), 'w') as f:
        f.write(version + '\n')
    if os.path.exists(root):  # an older version of the demo data: replace it
        shutil.rmtree(root)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        os.rename(tmp, root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root

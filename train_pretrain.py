"""MoCo v3 self-supervised pretraining (Chen, Xie, He, ICCV 2021: Sec. 3, Algorithm 1, recipes of Sec. 4).

    python train_pretrain.py                                   # the demo: a small ViT on built-in data, CPU ok
    torchrun --nproc_per_node=8 train_pretrain.py --arch vit_base /data/imagenet     # the paper's ViT-B recipe

Reads top to bottom: arguments -> distributed setup -> data -> model -> optimizer -> resume -> loop -> save.
Flag names are those of the official main_moco.py, so published commands run unchanged.
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import time

import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2 as T
from tqdm import tqdm

import moco
from lars_lamb import LAMB, LARS

# Inputs are normalised with ImageNet's statistics, as in the official code (also for the demo data).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- arguments
def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 pretraining')
    p.add_argument('data', nargs='?', metavar='DATA', help='ImageNet layout: DATA/train/<class>/<image>; '
                   'omitted: the built-in dataset (data/moco_demo) and, with no other flag, --preset demo')
    p.add_argument('--preset', help="'demo': a small ViT on small images, minutes on a laptop CPU")
    p.add_argument('-a', '--arch', help=f'backbone (resnet50): {", ".join(moco.ARCHS)}')
    p.add_argument('--img-size', type=int, help='training crop size in pixels (224)')
    p.add_argument('--patch-size', type=int, help='ViT patch size (16)')
    g = p.add_argument_group('optimisation; defaults: the recipe of --arch (official CONFIG.md)')
    g.add_argument('--epochs', type=int)
    g.add_argument('--start-epoch', type=int, default=0, help='first epoch, for manual restarts')
    g.add_argument('-b', '--batch-size', type=int, help='GLOBAL batch, split evenly over the processes')
    g.add_argument('--lr', '--learning-rate', type=float, help='base lr; the actual lr is lr x batch / 256')
    g.add_argument('--wd', '--weight-decay', type=float, dest='weight_decay')
    g.add_argument('--optimizer', help='lars (ResNet), adamw (ViT) or lamb')
    g.add_argument('--warmup-epochs', type=int, help='linear lr warmup, then a half-cosine')
    g.add_argument('--crop-min', type=float, help='smallest RandomResizedCrop area fraction')
    g = p.add_argument_group('MoCo')
    g.add_argument('--moco-dim', type=int, help='output dim of projector and predictor (256)')
    g.add_argument('--moco-mlp-dim', type=int, help='hidden dim of the MLP heads (4096)')
    g.add_argument('--moco-m', type=float, help='momentum of the key encoder (0.99)')
    g.add_argument('--moco-m-cos', action=argparse.BooleanOptionalAction,
                   help='raise the momentum from --moco-m to 1 with a half-cosine')
    g.add_argument('--moco-t', type=float, help='softmax temperature tau (ResNet 1.0, ViT 0.2)')
    g.add_argument('--stop-grad-conv1', action=argparse.BooleanOptionalAction,
                   help='freeze the random patch projection of a ViT: the stability trick of Sec. 4.2')
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default='output/pretrain', help='checkpoints, log.jsonl, config.json')
    g.add_argument('--resume', default='', help="checkpoint to continue, or 'auto': the latest in --output-dir")
    g.add_argument('--pretrained', default='', help='MoCo weights to start from (fresh optimizer and schedule)')
    g.add_argument('--save-every', type=int, default=0, help='also keep checkpoint_<epoch>.pth every N epochs')
    g.add_argument('--knn-data', help='DIR with labelled train/ and val/: kNN top-1 every epoch')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', type=int, help='data-loading processes per process (cores / GPUs, <= 8)')
    g.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], help='CUDA autocast dtype (bf16); CPU: fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('-p', '--print-freq', type=int, help='log every N steps (10)')
    g = p.add_argument_group('official launch flags: accepted and ignored, torchrun sets these')
    for flag in ('--world-size', '--rank', '--dist-url', '--dist-backend', '--gpu'):
        g.add_argument(flag)
    g.add_argument('--multiprocessing-distributed', action='store_true')
    return p


# The paper's recipes (official CONFIG.md). Flags the user gives win; the recipe fills the rest.
RECIPES = {
    'resnet': dict(optimizer='lars', lr=0.6, weight_decay=1e-6, moco_m=0.99, moco_t=1.0, warmup_epochs=10,
                   crop_min=0.2, moco_m_cos=True, stop_grad_conv1=False, batch_size=4096, epochs=100),
    'vit': dict(optimizer='adamw', lr=1.5e-4, weight_decay=0.1, moco_m=0.99, moco_t=0.2, warmup_epochs=40,
                crop_min=0.08, moco_m_cos=True, stop_grad_conv1=True, batch_size=4096, epochs=300),
}
GENERIC = dict(arch='resnet50', img_size=224, moco_dim=256, moco_mlp_dim=4096, print_freq=10)
PRESETS = {
    # Small enough for 2 CPU cores in under 10 minutes: a 4-block, 128-dim ViT with 4-px patches on 32-px images.
    # Trials on the built-in data (see README) also chose: momentum 0.9 (few hundred steps: the keys must follow),
    # a trainable patch projection (the frozen one cures large-batch spikes, which a batch of 128 does not have,
    # and costs a tiny model accuracy), crops of at least 30% of a 32-px image so both views still show the shape.
    'demo': dict(arch='vit_tiny', backbone_kwargs=dict(depth=4, embed_dim=128, num_heads=4), img_size=32,
                 patch_size=4, epochs=8, batch_size=128, lr=2e-3, warmup_epochs=1, moco_mlp_dim=1024,
                 moco_m=0.9, stop_grad_conv1=False, crop_min=0.3, workers=1, print_freq=10),
}


def fill_defaults(args):
    """User flags > preset > recipe of the arch > generic defaults. Returns the backbone kwargs."""
    backbone_kwargs = {}
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise SystemExit(f'error: unknown --preset {args.preset!r}; choose from {", ".join(PRESETS)}')
        preset = dict(PRESETS[args.preset])
        if args.arch in (None, preset['arch']):
            backbone_kwargs.update(preset.pop('backbone_kwargs'))
        preset.pop('backbone_kwargs', None)
        for k, v in preset.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k, v in GENERIC.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.arch not in moco.ARCHS:
        raise SystemExit(f'error: unknown arch {args.arch!r}; choose from {", ".join(moco.ARCHS)}')
    is_vit = args.arch.startswith('vit')
    recipe = dict(RECIPES['vit' if is_vit else 'resnet'])
    if not is_vit:      # CONFIG.md: longer ResNet-50 schedules use a lower lr, more decay and momentum
        epochs = args.epochs or recipe['epochs']
        recipe.update(lr=0.6 if epochs < 300 else 0.3, weight_decay=1.5e-6 if epochs >= 1000 else 1e-6,
                      moco_m=0.996 if epochs >= 1000 else 0.99)
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.optimizer not in ('lars', 'adamw', 'lamb'):
        raise SystemExit(f'error: unknown optimizer {args.optimizer!r}; choose from lars, adamw, lamb')
    if is_vit:
        backbone_kwargs.update(img_size=args.img_size, stop_grad_conv1=args.stop_grad_conv1)
        if args.patch_size is not None:
            backbone_kwargs['patch_size'] = args.patch_size
    return backbone_kwargs


# ----------------------------------------------------------------------------- distributed setup
def init_distributed():
    """torchrun's env:// when RANK is set (NCCL on GPUs, gloo on CPUs), else one plain process.
    Returns (rank, world_size, local_rank, device)."""
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, local_rank, device


def save_atomic(obj, path):
    """torch.save to a temporary file next to `path`, then rename: a crash never leaves a torn checkpoint."""
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- data: the built-in dataset
DEMO_VERSION = 'moco-demo-v3'
DEMO_SIZE, DEMO_TRAIN, DEMO_VAL = 32, 500, 100          # px; images per class in train/ and in val/
# Shape and background are black and white, in either order, independently of the class. Contrastive learning
# tells an image from the others of its batch by whatever its two crops share and the augmentations leave
# intact; colour is such a cue (ColorJitter's hue 0.1 barely moves a saturated colour), so it must carry no
# identity: with fully random colours the model matched crops by colour and kNN stayed near chance; with a
# 5-colour palette (20 colour pairs) kNN gained only 9 points in 8 epochs; with two
# tones every image shares its colours with half of the batch, and shape is what identifies it (+29 in 8).
DEMO_PALETTE = ((0, 0, 0), (255, 255, 255))
_STAR = [((1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5), -(1.0 if i % 2 == 0 else 0.45) *
          math.cos(i * math.pi / 5)) for i in range(10)]
DEMO_SHAPES = {                                          # outlines in units of the shape's radius
    'triangle': [(0, -1), (0.87, 0.5), (-0.87, 0.5)], 'square': [(-.7, -.7), (.7, -.7), (.7, .7), (-.7, .7)],
    'star': _STAR, 'arrow': [(-1, -.35), (.1, -.35), (.1, -1), (1, 0), (.1, 1), (.1, .35), (-1, .35)],
    'cross': [(-.35, -1), (.35, -1), (.35, -.35), (1, -.35), (1, .35), (.35, .35), (.35, 1), (-.35, 1),
              (-.35, .35), (-1, .35), (-1, -.35), (-.35, -.35)],
    'ell': [(-1, -1), (-.3, -1), (-.3, .3), (1, .3), (1, 1), (-1, 1)],
    'tee': [(-1, -1), (1, -1), (1, -.3), (.35, -.3), (.35, 1), (-.35, 1), (-.35, -.3), (-1, -.3)],
    'circle': None, 'ring': None, 'crescent': None}      # these three are drawn as discs
DEMO_CLASSES = tuple(DEMO_SHAPES)


def _demo_image(name, seed):
    """One image: a shape of a random size, position and rotation, in palette colours."""
    rng, ss = random.Random(seed), 4                     # draw 4x larger, then downsample: smooth edges
    bg, fg = rng.sample(DEMO_PALETTE, 2)
    img = Image.new('RGB', (DEMO_SIZE * ss,) * 2, bg)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.42) * DEMO_SIZE * ss
    x, y = (rng.uniform(r, DEMO_SIZE * ss - r) for _ in range(2))
    a = rng.uniform(0, 2 * math.pi)
    disc = lambda dx, dy, rr, colour: draw.ellipse((x + dx - rr, y + dy - rr, x + dx + rr, y + dy + rr), colour)
    if DEMO_SHAPES[name] is not None:
        draw.polygon([(x + r * (u * math.cos(a) - v * math.sin(a)), y + r * (u * math.sin(a) + v * math.cos(a)))
                      for u, v in DEMO_SHAPES[name]], fg)
    else:
        disc(0, 0, r, fg)
        if name == 'ring':
            disc(0, 0, 0.55 * r, bg)
        elif name == 'crescent':                         # a disc with a shifted disc cut out
            disc(0.45 * r * math.cos(a), 0.45 * r * math.sin(a), 0.8 * r, bg)
    return img.resize((DEMO_SIZE, DEMO_SIZE), Image.BOX)


def build_demo_dataset(root='data/moco_demo'):
    """Generate the built-in dataset once (fixed seeds, so every run and machine gets the same images) as an
    ImageFolder: root/train/<class>/*.png for pretraining, root/val/<class>/*.png held out for evaluation."""
    marker = os.path.join(root, 'VERSION')
    if os.path.isfile(marker) and open(marker).read().strip() == DEMO_VERSION:
        return root
    if os.path.exists(root) and not os.path.isfile(marker):
        raise SystemExit(f'error: {root} exists but is not a built-in demo dataset (no {marker}); move it away')
    tmp = f'{root.rstrip(os.sep)}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n, offset in (('train', DEMO_TRAIN, 0), ('val', DEMO_VAL, 10 ** 6)):
        for label, name in enumerate(DEMO_CLASSES):
            os.makedirs(os.path.join(tmp, split, name))
            for i in range(n):
                _demo_image(name, offset + label * 10 ** 5 + i).save(os.path.join(tmp, split, name, f'{i:04d}.png'))
    with open(os.path.join(tmp, 'VERSION'), 'w') as f:
        f.write(DEMO_VERSION + '\n')
    if os.path.exists(root):                             # an older version of the demo data: replace it
        shutil.rmtree(root)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
        os.rename(tmp, root)
    except OSError:                                      # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- data: augmentations
def pretrain_transforms(img_size, crop_min):
    """BYOL's asymmetric augmentations (Grill et al. 2020), as in the official MoCo v3: crop 1 is always
    blurred, crop 2 rarely blurred and sometimes solarized. torchvision v2 ops on PIL images (measured faster
    here than on uint8 tensors: ColorJitter's hue costs more on tensors), and PIL's blur, see GaussianBlur."""
    def crop(blur_p, solarize_p):
        ops = [T.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
               T.RandomGrayscale(p=0.2),
               T.RandomApply([GaussianBlur((0.1, 2.0), scale=img_size / 224)], p=blur_p)]
        if solarize_p > 0:
            ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
        return T.Compose(ops + [T.RandomHorizontalFlip(), *to_normalized_tensor()])
    return crop(1.0, 0.0), crop(0.1, 0.2)


class GaussianBlur:
    """Gaussian blur of a PIL image, sigma ~ U[0.1, 2.0] px: PIL's ImageFilter.GaussianBlur(radius=sigma), the op
    the official MoCo v3 applies. It is 7x faster than torchvision's 23-tap kernel blur at 224 px (an extended
    box filter, whose cost does not grow with sigma; `bench.py --data`), which made the blur 2/3 of a worker's
    time. sigma is drawn from torch's RNG, as the torchvision ops around it, and multiplied by `scale`
    (img_size / 224 in pretrain_transforms: the same blur relative to the crop at any size, the paper's at 224)."""

    def __init__(self, sigma=(0.1, 2.0), scale=1.0):
        self.sigma, self.scale = sigma, scale

    def __call__(self, img):
        sigma = self.scale * torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self):
        return f'GaussianBlur(sigma={self.sigma}, scale={self.scale:g})'


def to_normalized_tensor():
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(img_size):
    """Resize to img_size * 256/224, centre crop: the usual evaluation view (as in train_linear.py)."""
    return T.Compose([T.Resize(int(img_size * 256 / 224), antialias=True), T.CenterCrop(img_size),
                      *to_normalized_tensor()])


class TwoCrops:
    """Two differently augmented views of one image: the positive pair of the contrastive loss."""

    def __init__(self, aug1, aug2):
        self.aug1, self.aug2 = aug1, aug2

    def __call__(self, img):
        return [self.aug1(img), self.aug2(img)]


class UnreadableImage(Exception):
    """Raised by load_image (maybe inside a worker); main() turns it into one line naming the file."""


def load_image(path):
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:
        raise UnreadableImage(f'error: cannot read image {path}: {str(e).splitlines()[0]}') from None


def image_folder(root, transform):
    """An ImageFolder, with bad input (missing or empty folder) reported in one line."""
    if not os.path.isdir(root):
        raise SystemExit(f'error: no folder {root} (expected ImageNet layout: DATA/train/<class>/<image>)')
    try:
        return torchvision.datasets.ImageFolder(root, transform, loader=load_image)
    except FileNotFoundError as e:
        raise SystemExit(f'error: no images in {root}: {e}') from None


def check_same_classes(train_set, val_set, root):
    """Labels are indices into each ImageFolder's sorted class list: root/train and root/val must list the same."""
    if val_set.classes != train_set.classes:
        raise SystemExit(f'error: the classes of {root}/val differ from those of {root}/train')


def make_loader(dataset, batch_size, rank, world_size, workers, train, pin_memory, seed):
    """Each process reads its own shard (DistributedSampler, also for one process: one code path).
    Training shuffles by (seed, epoch) and drops the ragged end; evaluation keeps dataset order."""
    sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed,
                                                  drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=pin_memory, drop_last=train)


# ----------------------------------------------------------------------------- kNN monitor
@torch.no_grad()
def extract_features(model, loader, device, amp_dtype=None):
    """Backbone features of every image of `loader` (eval mode, no grad) -> ((N, D) float32, (N,) int64).
    Under torchrun the loader is expected to use a DistributedSampler(shuffle=False): each rank embeds every
    world_size-th image, and the gather below interleaves them back into dataset order."""
    model = getattr(model, 'module', model)              # unwrap DDP
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            f = model.forward_features(images) if hasattr(model, 'forward_features') else model(images)
        feats.append(f.float())
        labels.append(target.to(device))
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    sampler = getattr(loader, 'sampler', None)
    if dist.is_available() and dist.is_initialized() and isinstance(sampler, torch.utils.data.DistributedSampler):
        world = dist.get_world_size()
        # DistributedSampler(shuffle=False) gives rank r the indices r, r + W, r + 2W, ... (padded to equal
        # length by repeating the first ones), so stacking (W, n, D) -> (n, W, D) restores dataset order.
        all_f = [torch.empty_like(feats) for _ in range(world)]
        all_l = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_f, feats)
        dist.all_gather(all_l, labels)
        n = len(loader.dataset)
        feats = torch.stack(all_f, 1).flatten(0, 1)[:n]
        labels = torch.stack(all_l, 1).flatten(0, 1)[:n]
    return feats.cpu(), labels.cpu()


@torch.no_grad()
def knn_predict(train_feats, train_labels, query_feats, num_classes, k=20, T=0.07):
    """Weighted kNN (Wu et al. 2018, as used by DINO): each query's k most cosine-similar training features
    vote for their labels with weight exp(sim / T). Returns class scores (Q, C)."""
    train_feats = torch.nn.functional.normalize(train_feats.float(), dim=1)     # (N, D)
    query_feats = torch.nn.functional.normalize(query_feats.float(), dim=1)     # (Q, D)
    k = min(k, train_feats.shape[0])
    chunk = max(1, 2 ** 24 // max(1, train_feats.shape[0]))                   # bound the (chunk, N) matrix
    scores = []
    for q in query_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(k, dim=1)                          # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels.to(q.device)[idx], (sim / T).exp())
        scores.append(votes)
    return torch.cat(scores)


# ----------------------------------------------------------------------------- schedules (pure functions)
def adjust_learning_rate(e, lr, warmup_epochs, epochs):
    """lr at fractional epoch e: linear warmup (Goyal et al. 2017), then a half-cosine decay to 0."""
    if e < warmup_epochs:
        return lr * e / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_moco_momentum(e, moco_m, epochs):
    """Key-encoder momentum at fractional epoch e, raised from moco_m to 1 with a half-cosine (BYOL)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * e / epochs)) * (1.0 - moco_m)


# ----------------------------------------------------------------------------- monitoring and checkpoints
def knn_top1(model, loaders, num_classes, device, amp_dtype):
    """kNN top-1 (%) of the held-out split against the labelled train split, on backbone features."""
    train_f, train_l = extract_features(model, loaders[0], device, amp_dtype)
    val_f, val_l = extract_features(model, loaders[1], device, amp_dtype)
    pred = knn_predict(train_f.to(device), train_l.to(device), val_f.to(device), num_classes).argmax(1).cpu()
    return 100.0 * (pred == val_l).float().mean().item()


def grad_norm(module):
    """L2 norm of a module's gradients, None when it has none (e.g. the frozen patch projection)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None


def load_checkpoint(path):
    """A checkpoint of ours or of the official code, else one line and exit."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f'error: no checkpoint at {path}') from None
    except Exception as e:
        raise SystemExit(f'error: {path} is not a checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), dict):
        raise SystemExit(f'error: {path} is not a MoCo v3 checkpoint (no state_dict)')
    return ckpt


def load_weights(model, ckpt, path):
    try:    # ours are bare; the official ones carry DDP's 'module.' prefix
        model.load_state_dict(moco.strip_prefix(ckpt['state_dict']))
    except RuntimeError as e:
        raise SystemExit(f'error: {path} does not fit this model ({str(e).splitlines()[0]})') from None


# ----------------------------------------------------------------------------- main
def main(args):
    rank, world_size, local_rank, device = init_distributed()
    if args.data is None and args.preset is None and args.arch is None:
        args.preset = 'demo'                                   # no arguments at all: the demo
    backbone_kwargs = fill_defaults(args)
    if args.batch_size % world_size:
        raise SystemExit(f'error: batch size {args.batch_size} is not divisible by {world_size} processes')
    batch = args.batch_size // world_size                      # per process
    lr = args.lr * args.batch_size / 256                       # the linear scaling rule (Goyal et al. 2017)
    if args.workers is None:
        args.workers = min(8, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))
    cuda = device.type == 'cuda'
    args.dtype = args.dtype if cuda and args.dtype else ('bf16' if cuda else 'fp32')   # the CPU runs fp32
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[args.dtype]
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.multiprocessing_distributed or any(getattr(args, k) for k in ('world_size', 'rank', 'dist_url', 'gpu')):
        say('note: --world-size/--rank/--dist-url/--gpu/--multiprocessing-distributed are ignored: use torchrun')

    # ------------------------------------------------------------------------- data
    if args.data is None:                                      # the built-in dataset, made once by rank 0
        if rank == 0:
            build_demo_dataset()
        if world_size > 1:
            dist.barrier()
        args.data = 'data/moco_demo'
        args.knn_data = args.knn_data or args.data
    if not os.path.isdir(args.data):
        raise SystemExit(f'error: data folder {args.data} does not exist')
    train_set = image_folder(os.path.join(args.data, 'train'),
                             TwoCrops(*pretrain_transforms(args.img_size, args.crop_min)))
    if len(train_set) < args.batch_size:
        raise SystemExit(f'error: {len(train_set)} training images, fewer than one batch of {args.batch_size}')
    train_loader = make_loader(train_set, batch, rank, world_size, args.workers, True, cuda, args.seed)
    iters = len(train_loader)
    if args.knn_data:                                          # labelled train/ and val/ for the kNN monitor
        knn_sets = [image_folder(os.path.join(args.knn_data, s), eval_transform(args.img_size)) for s in ('train', 'val')]
        check_same_classes(*knn_sets, args.knn_data)
        knn_loaders = [make_loader(s, 256, rank, world_size, args.workers, False, cuda, args.seed) for s in knn_sets]

    # ------------------------------------------------------------------------- model
    torch.manual_seed(args.seed)                               # the same initial weights in every process
    model = moco.build_moco(args.arch, args.moco_dim, args.moco_mlp_dim, args.moco_t, **backbone_kwargs)
    if world_size > 1 and cuda:
        model = moco.convert_sync_batchnorm(model)             # BN statistics over the global batch
    raw_model = model = model.to(device, memory_format=memory_format(args.arch))  # the bare MoCo module: saved
    if args.pretrained:
        load_weights(model, load_checkpoint(args.pretrained), args.pretrained)
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

    # ------------------------------------------------------------------------- optimizer
    # As the official code: every parameter goes to the optimizer, weight decay on all of them (LARS skips
    # biases and norms, ndim <= 1). The momentum encoder and a frozen patch projection get no gradient: no step.
    if args.optimizer == 'lars':
        optimizer = LARS(raw_model.parameters(), lr, weight_decay=args.weight_decay, momentum=0.9)
    elif args.optimizer == 'lamb':
        optimizer = LAMB(raw_model.parameters(), lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(raw_model.parameters(), lr, weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler('cuda', enabled=args.dtype == 'fp16')   # fp16 only; bf16 needs no scaling

    # ------------------------------------------------------------------------- resume
    os.makedirs(args.output_dir, exist_ok=True)
    last_path = os.path.join(args.output_dir, 'checkpoint_last.pth')
    if args.resume == 'auto':
        args.resume = last_path if os.path.isfile(last_path) else ''
    start_epoch, knn_init = args.start_epoch, None
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt.get('arch', args.arch) != args.arch:
            raise SystemExit(f'error: {args.resume} holds a {ckpt["arch"]}, not a {args.arch}')
        load_weights(raw_model, ckpt, args.resume)
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except (KeyError, ValueError) as e:
            raise SystemExit(f'error: the optimizer state of {args.resume} does not fit ({e})') from None
        if ckpt.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        start_epoch, knn_init = ckpt['epoch'], ckpt.get('knn_init')   # 'epoch' = epochs done, as official

    say(json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    if args.preset:
        say(f'preset {args.preset}: {args.arch} {backbone_kwargs}, {args.epochs} epochs, moco-m {args.moco_m}, '
            f'mlp dim {args.moco_mlp_dim}, crop-min {args.crop_min}, tau {args.moco_t}')
    say(f'global batch {args.batch_size} = {world_size} x {batch} per process; base lr {args.lr:g}, actual lr '
        f'{lr:g} (= base x {args.batch_size}/256); {args.optimizer}; {args.dtype} on {device}; {iters} steps/epoch'
        + (f'; resuming {args.resume} at epoch {start_epoch}' if args.resume else ''))
    log_path = os.path.join(args.output_dir, 'log.jsonl')
    if rank == 0:
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump(dict(vars(args), actual_lr=lr, world_size=world_size, backbone_kwargs=backbone_kwargs), f)
        if not args.resume:
            open(log_path, 'w').close()

    def log(**row):                                            # one JSON line per logged step or epoch
        if rank == 0:
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')

    def monitor(epoch, loss=None):                             # the kNN top-1 of the query backbone
        acc = knn_top1(raw_model.base_encoder, knn_loaders, len(knn_sets[0].classes), device, amp_dtype) \
            if args.knn_data else None
        say(f'epoch {epoch}/{args.epochs}' + (f': loss {loss:.4f}' if loss is not None else '')
            + (f', kNN top-1 {acc:.1f}%' if acc is not None else ''))
        log(epoch=epoch, loss_avg=loss, knn_top1=acc)
        return acc

    # ------------------------------------------------------------------------- loop
    knn = None
    try:                                                       # an unreadable image may surface in a worker
        if start_epoch == 0:
            knn_init = knn = monitor(0)                        # the random-init baseline
        spikes = {'grad_first': [], 'grad_last': []}
        for epoch in range(start_epoch, args.epochs):
            # Data order and augmentations depend on (seed, epoch, rank) alone, so resuming at an epoch replays
            # what an uninterrupted run would have seen (the loader seeds its workers from this RNG).
            train_loader.sampler.set_epoch(epoch)
            torch.manual_seed((args.seed * 10 ** 4 + epoch) * 10 ** 4 + rank)
            loss = train_one_epoch(model, raw_model, optimizer, scaler, train_loader, epoch, lr, amp_dtype,
                                   device, args, rank, spikes, log)
            knn = monitor(epoch + 1, loss)
            # ------------------------------------------------------------------------- save
            if rank == 0:
                ckpt = {'state_dict': raw_model.state_dict(), 'arch': args.arch, 'backbone_kwargs': backbone_kwargs,
                        'epoch': epoch + 1, 'step': (epoch + 1) * iters, 'args': vars(args),
                        'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict() if scaler.is_enabled()
                        else None, 'rng': {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all()
                                           if cuda else []}, 'knn_init': knn_init, 'knn_top1': knn}
                save_atomic(ckpt, last_path)
                if args.save_every and (epoch + 1) % args.save_every == 0:
                    save_atomic(ckpt, os.path.join(args.output_dir, f'checkpoint_{epoch + 1:04d}.pth'))
    except UnreadableImage as e:                               # a worker's copy carries its traceback: 1 line
        msg = str(e).strip().splitlines()[-1]
        raise SystemExit(msg[msg.find('error: '):]) from None
    if args.preset == 'demo' and knn is not None and knn_init is not None:
        say(f'demo kNN top-1: {knn:.1f}% (random init: {knn_init:.1f}%)')
    if world_size > 1:
        dist.destroy_process_group()
    return knn


def memory_format(arch):
    """channels_last makes convolutions ~12% faster (bench.py); a ViT has a single conv: only ResNets use it."""
    return torch.channels_last if arch in moco.resnet.ARCHS else torch.contiguous_format


def train_one_epoch(model, raw_model, optimizer, scaler, loader, epoch, lr, amp_dtype, device, args, rank,
                    spikes, log):
    """One pass over the data; returns the mean loss. Logs every print_freq steps and at the last one."""
    iters, backbone = len(loader), raw_model.base_encoder
    # Where the paper watches gradients (its Fig. 4): the first layer and the last block.
    first, last = (backbone.patch_embed.proj, backbone.blocks[-1]) if hasattr(backbone, 'blocks') else \
        (backbone.conv1, backbone.layer4[-1])
    loss_sum = torch.zeros((), device=device)                  # summed on the device: no sync per step
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', disable=rank != 0, leave=False)
    tic, seen = time.time(), 0
    for i, (images, _) in enumerate(bar):
        e = epoch + i / iters                                  # fractional epoch, as the official code
        step_lr = adjust_learning_rate(e, lr, args.warmup_epochs, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        m = adjust_moco_momentum(e, args.moco_m, args.epochs) if args.moco_m_cos else args.moco_m
        x1, x2 = (x.to(device, non_blocking=True, memory_format=memory_format(args.arch)) for x in images)  # (B, 3, H, W)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = model(x1, x2, m)                            # momentum update, then the symmetrised loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()                              # nan or inf stays so: checked below
        seen += x1.shape[0] * (dist.get_world_size() if dist.is_initialized() else 1)
        if i % args.print_freq and i != iters - 1:
            continue
        # ------------------------------------------------------------------------- log (syncs the device)
        bad = (~torch.isfinite(loss_sum)).float()
        if dist.is_initialized():                              # stop every process together
            dist.all_reduce(bad)
        if bad.item():                                         # before any save: the last checkpoint stays good
            raise SystemExit(f'error: the loss became nan or inf in epoch {epoch + 1} (by step {i}); stopped, '
                             f'the last good checkpoint is in {args.output_dir}')
        row = dict(epoch=epoch + 1, step=epoch * iters + i, loss=loss.item(), lr=step_lr, m=m,
                   img_s=seen / (time.time() - tic), grad_first=grad_norm(first), grad_last=grad_norm(last))
        for k, history in spikes.items():                      # the paper's instability signal
            if row[k] is not None:
                if len(history) >= 10 and row[k] > 10 * statistics.median(history[-100:]):
                    row['spike'] = k
                    if rank == 0:
                        tqdm.write(f'warning: {k} gradient norm {row[k]:.3g} is above 10x its running median')
                history.append(row[k])
        bar.set_postfix(loss=f'{row["loss"]:.4f}', lr=f'{step_lr:.2e}', m=f'{m:.4f}', img_s=f'{row["img_s"]:.0f}')
        log(**row)
        tic, seen = time.time(), 0
    return loss_sum.item() / iters


if __name__ == '__main__':
    main(get_args_parser().parse_args())

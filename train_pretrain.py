"""MoCo v3 self-supervised pretraining (Chen, Xie, He, ICCV 2021, Sec. 3 and Algorithm 1).

One process on a CPU or a GPU:      python train_pretrain.py                (the demo, no data needed)
Many GPUs / nodes via torchrun:     torchrun --nproc_per_node=8 train_pretrain.py --arch vit_base /data/imagenet
"""
import math
import os
import random
import shutil

import torch
import torch.distributed as dist

# Inputs are normalised with ImageNet's statistics, as in the official code (also for the demo data).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- distributed setup
def init_distributed():
    """torchrun's env:// when RANK is set (one process per GPU, or gloo on CPU), else one plain process.
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


# ----------------------------------------------------------------------------- the built-in dataset
DEMO_VERSION = 'moco-demo-v1'
DEMO_CLASSES = ('circle', 'ring', 'triangle', 'square', 'star', 'cross', 'arrow', 'ell', 'tee', 'crescent')
# A small palette, drawn independently of the class for shape, background and clutter. Small on purpose: many
# images share a colour pair, so colour can neither classify an image nor tell it apart from the rest of a
# batch, and contrastive learning must look at shape (fully random colours let it match crops by colour alone).
DEMO_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                (245, 130, 48), (145, 30, 180), (240, 240, 240), (30, 30, 30))
DEMO_SIZE, DEMO_TRAIN, DEMO_VAL = 32, 500, 100          # px; images per class in train/ and val/


def _shape_polygon(name, r):
    """Outline of one class as a list of (x, y) around the origin, radius ~r (pixels)."""
    def regular(n, r0, phase=0.0):
        return [(r0 * math.cos(phase + 2 * math.pi * i / n), r0 * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]
    w = 0.35 * r
    if name == 'circle':
        return regular(48, r)
    if name == 'ring':                                   # outer circle, then the hole in reverse
        return regular(48, r) + [regular(48, 0.55 * r)[0]] + regular(48, 0.55 * r)[::-1] + [regular(48, r)[0]]
    if name == 'triangle':
        return regular(3, r, -math.pi / 2)
    if name == 'square':
        return regular(4, r, math.pi / 4)
    if name == 'star':
        pts = []
        for i in range(10):
            pts.append(regular(10, r if i % 2 == 0 else 0.45 * r, -math.pi / 2)[i])
        return pts
    if name == 'cross':
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                (-r, -w), (-w, -w)]
    if name == 'arrow':
        return [(-r, -w), (0.1 * r, -w), (0.1 * r, -r), (r, 0), (0.1 * r, r), (0.1 * r, w), (-r, w)]
    if name == 'ell':
        return [(-r, -r), (-r + 2 * w, -r), (-r + 2 * w, r - 2 * w), (r, r - 2 * w), (r, r), (-r, r)]
    if name == 'tee':
        return [(-r, -r), (r, -r), (r, -r + 2 * w), (w, -r + 2 * w), (w, r), (-w, r), (-w, -r + 2 * w),
                (-r, -r + 2 * w)]
    if name == 'crescent':                               # outer arc, then an inner arc of a shifted circle
        outer = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 2 + math.pi * i / 24 for i in range(25))]
        inner = [(0.35 * r + 0.75 * r * math.cos(a), 0.75 * r * math.sin(a) * 1.25)
                 for a in (3 * math.pi / 2 - math.pi * i / 24 for i in range(25))]
        return outer + inner
    raise ValueError(name)


def _demo_image(label, seed):
    """One image: a rotated, scaled, shifted shape of class `label` over a background with clutter."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    ss = 4                                               # draw 4x larger, then downsample: anti-aliased edges
    size = DEMO_SIZE * ss
    bg, fg = rng.sample(DEMO_PALETTE, 2)
    img = Image.new('RGB', (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):                   # clutter: thin strokes in palette colours
        pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(pts, fill=rng.choice(DEMO_PALETTE), width=rng.randint(1, 2) * ss)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    a = rng.uniform(0, 2 * math.pi)
    ca, sa = math.cos(a), math.sin(a)
    pts = [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in _shape_polygon(DEMO_CLASSES[label], r)]
    draw.polygon(pts, fill=fg)
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
                seed = offset + label * 10 ** 5 + i
                _demo_image(label, seed).save(os.path.join(tmp, split, name, f'{i:04d}.png'))
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

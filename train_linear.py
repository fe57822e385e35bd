"""Linear probing and kNN evaluation of a frozen MoCo v3 backbone (Chen, Xie, He, ICCV 2021).

Linear probing is the metric of the paper's tables (73.2 ViT-S, 76.7 ViT-B, 74.6 R-50 in the official CONFIG.md).
This file reproduces the official main_lincls.py protocol and adds a weighted kNN and a fast CPU mode.

Demo (probes output/pretrain/checkpoint_last.pth against random init):  python train_linear.py
The paper's protocol, 8 GPUs:  torchrun --nproc_per_node=8 train_linear.py -a vit_base --lr 3 \
                                   --pretrained vit-b-300ep.pth.tar /data/imagenet
"""
import argparse
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms
from tqdm import tqdm

import moco
from train_pretrain import (IMAGENET_MEAN, IMAGENET_STD, build_demo_dataset, check_same_classes, extract_features,
                            init_distributed, knn_predict, save_atomic)

DEMO_CHECKPOINT = 'output/pretrain/checkpoint_last.pth'
NOT_PAPER = 'cached features: not the paper\'s protocol'


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 linear probing and kNN', add_help=True)
    p.add_argument('data', nargs='?', default=None, metavar='DATA',
                   help='ImageFolder root with train/ and val/ (default: the built-in demo dataset)')
    g = p.add_argument_group('model')
    g.add_argument('-a', '--arch', default=None, help='backbone; default: the checkpoint\'s, else resnet50')
    g.add_argument('--pretrained', default='', help='pretraining checkpoint: this project\'s or an official one')
    g.add_argument('--random-init', action='store_true',
                   help='build the architecture of --pretrained but keep random weights: the baseline')
    g.add_argument('--img-size', type=int, default=None,
                   help='train and eval crop; eval resizes to img-size*256/224 first (default: checkpoint\'s, or 224)')
    g = p.add_argument_group('optimisation (defaults: the official main_lincls.py)')
    g.add_argument('--epochs', type=int, default=90)
    g.add_argument('--start-epoch', type=int, default=0, help='manual epoch number (resume sets it)')
    g.add_argument('-b', '--batch-size', type=int, default=1024, help='GLOBAL batch, split over processes')
    g.add_argument('--lr', '--learning-rate', type=float, default=None, dest='lr',
                   help='base lr, scaled by batch/256 (default 0.1; 3 for ViTs, as in the official CONFIG.md)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', '--weight-decay', type=float, default=0.0, dest='weight_decay')
    g = p.add_argument_group('kNN and the CPU mode')
    g.add_argument('--knn', action='store_true', help='also report weighted kNN top-1/top-5 on frozen features')
    g.add_argument('--knn-k', type=int, default=20, help='neighbours that vote')
    g.add_argument('--knn-t', type=float, default=0.07, help='temperature of the exp(sim / T) vote weights')
    g.add_argument('--cache-features', action='store_true',
                   help='embed train/val once without augmentation and train the linear layer on those '
                        'features: minutes instead of hours on a CPU, but NOT the paper\'s protocol')
    g = p.add_argument_group('run')
    g.add_argument('-e', '--evaluate', action='store_true', help='only evaluate (e.g. --resume model_best.pth)')
    g.add_argument('--resume', default='', help='a checkpoint of this script, or "auto" (the output dir\'s last)')
    g.add_argument('--output-dir', default='output/linear')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', type=int, default=8)
    g.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'],
                   help='autocast dtype of the frozen backbone on CUDA (CPU runs fp32); the head trains in fp32')
    g.add_argument('-p', '--print-freq', type=int, default=10)
    return p


# ----------------------------------------------------------------------------- metrics (train_finetune.py too)
@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Percentage of rows of output (B, C) whose target (B,) is among the k highest scores, for each k.
    k larger than C counts as C (with 3 classes, top-5 is 100%)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices                                     # (B, maxk)
    correct = pred == target[:, None]                                           # (B, maxk)
    return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100.0 for k in topk]


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None):
    """Top-1, top-5 (%) and mean cross-entropy of `model` over `loader` in eval mode. Under torchrun the sums
    are all-reduced: give each rank its own share of the images, each image once (a padded DistributedSampler
    would count its few repeated images twice)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)                  # loss, top-1 hits, top-5 hits, n
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output, b = output.float(), target.shape[0]
        top1, top5 = accuracy(output, target, topk=(1, 5))
        sums += torch.tensor([F.cross_entropy(output, target, reduction='sum').item(),
                              top1 * b / 100, top5 * b / 100, b], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    return dict(top1=100 * top1 / n, top5=100 * top5 / n, loss=loss / n)


# ----------------------------------------------------------------------------- checkpoints and the frozen model
def load_checkpoint(path, what):
    """A dict saved by torch.save, or one line and exit."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f'error: {what} {path} does not exist')
    except Exception as e:
        raise SystemExit(f'error: {what} {path} is not a readable checkpoint ({type(e).__name__})')
    if not isinstance(ckpt, dict):
        raise SystemExit(f'error: {what} {path} is not a checkpoint (no dict of weights)')
    return ckpt


def checkpoint_info(path):
    """(arch, backbone_kwargs, img_size) recorded by a pretraining checkpoint: ours records all three (the
    ViT's img_size among the kwargs), the official one only its arch, a bare state dict none."""
    ckpt = load_checkpoint(path, '--pretrained')
    kwargs = {k: v for k, v in (ckpt.get('backbone_kwargs') or {}).items() if k != 'num_classes'}
    img_size = kwargs.get('img_size') or (ckpt.get('args') or {}).get('img_size')
    return ckpt.get('arch'), kwargs, img_size


def build_model(arch, backbone_kwargs, num_classes, pretrained=''):
    """The official main_lincls.py model: the backbone (moco.load_backbone: the base encoder of a MoCo
    checkpoint, projector dropped, every other weight loaded strictly; random weights without `pretrained`)
    with a fresh linear classifier (`head` of a ViT, `fc` of a ResNet; weight N(0, 0.01), bias 0) and
    everything else frozen. -> (model, name of the classifier)"""
    try:
        model = (moco.load_backbone(pretrained, arch) if pretrained
                 else moco.build_backbone(arch, **{**backbone_kwargs, 'num_classes': 0}))
    except (ValueError, TypeError) as e:
        raise SystemExit(f'error: {e}')
    key = 'head' if arch.startswith('vit') else 'fc'
    head = nn.Linear(model.num_features, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    setattr(model, key, head)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(key + '.')
    # eval mode for good, also while training the head: BN in train mode would update its running statistics,
    # and linear probing may change nothing of the pretrained model (the official main_lincls.py does the same).
    return model.eval(), key


def sanity_check(model, reference, key):
    """The official sanity check: after probing, every backbone weight and buffer (BN statistics included)
    must be bit-identical to `reference` (the checkpoint's backbone); only the classifier `key` may change."""
    for k, v in model.state_dict().items():
        if k.startswith(key + '.'):
            continue
        if k not in reference or not torch.equal(v.cpu(), reference[k].cpu()):
            raise RuntimeError(f'sanity check failed: {k} changed during linear probing')


# ----------------------------------------------------------------------------- batches of frozen features
def backbone_batches(model, loader, device, amp_dtype):
    """(features (B, D) fp32, target (B,)) of each batch of images; no graph is built through the frozen
    backbone, which gives the same head gradients as the official model(images) at a fraction of the cost."""
    for images, target in loader:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feats = model.forward_features(images.to(device, non_blocking=True))
        yield feats.float(), target.to(device, non_blocking=True)


def feature_batches(feats, labels, batch_size, seed=None):
    """Mini-batches of cached features (N, D), shuffled by `seed` (None: in order)."""
    n = feats.shape[0]
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        idx = idx.to(feats.device)
        yield feats[idx], labels[idx]


def lr_at(epoch, init_lr, epochs):
    """The official per-epoch half-cosine decay, no warmup."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# ----------------------------------------------------------------------------- the run
def setup_run(args):
    """The start of train_linear.py and train_finetune.py: processes (torchrun or one), the autocast dtype (CUDA
    only), a print for rank 0, the batch check, --resume auto -> (rank, world, local_rank, device, amp_dtype, say)."""
    rank, world, local_rank, device = init_distributed()
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[args.dtype]
    amp_dtype = amp_dtype if device.type == 'cuda' else None                   # bf16 on a CPU is ~400x slower
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.batch_size % world:
        raise SystemExit(f'error: batch {args.batch_size} is not divisible by {world} processes')
    if args.resume == 'auto':
        last = os.path.join(args.output_dir, 'checkpoint_last.pth')
        args.resume = last if os.path.isfile(last) else ''
    return rank, world, local_rank, device, amp_dtype, say


def main(args):
    if args.data is None and not (args.pretrained or args.resume):
        return demo(args)
    rank, world, _, device, amp_dtype, say = setup_run(args)
    resume = load_checkpoint(args.resume, '--resume') if args.resume else None
    if resume is not None and 'best_acc1' not in resume:
        raise SystemExit(f'error: {args.resume} is no checkpoint of train_linear.py '
                         f'(a pretraining checkpoint goes to --pretrained)')
    if resume is not None and not args.pretrained:                             # probe the same backbone again
        pre = resume.get('args', {}).get('pretrained', '')
        args.pretrained = pre if pre and os.path.isfile(pre) else ''
        args.random_init = args.random_init or resume.get('args', {}).get('random_init', False)
    arch, kwargs, img_size = checkpoint_info(args.pretrained) if args.pretrained else (None, {}, None)
    if resume is not None:
        arch, kwargs, img_size = resume['arch'], resume['backbone_kwargs'], resume['img_size']
    if args.arch and arch and args.arch != arch:
        raise SystemExit(f'error: --arch {args.arch}, but the checkpoint holds a {arch}')
    arch, args.img_size = args.arch or arch or 'resnet50', args.img_size or img_size or 224
    if args.lr is None:
        args.lr = 3.0 if arch.startswith('vit') else 0.1                        # the official CONFIG.md
    torch.manual_seed(args.seed)

    # ---- data: the official augmentations (train) and resize-then-center-crop (val), ImageNet's statistics
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(args.data, split)):
            raise SystemExit(f'error: {os.path.join(args.data, split)} is not a directory: DATA must hold '
                             f'train/ and val/ in ImageFolder layout')
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.img_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    eval_tf = transforms.Compose([transforms.Resize(int(args.img_size * 256 / 224)),
                                  transforms.CenterCrop(args.img_size), transforms.ToTensor(), normalize])
    try:
        train_set = datasets.ImageFolder(os.path.join(args.data, 'train'), train_tf)
        train_eval_set = datasets.ImageFolder(os.path.join(args.data, 'train'), eval_tf)  # kNN / cached features
        val_set = datasets.ImageFolder(os.path.join(args.data, 'val'), eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f'error: {e}')
    check_same_classes(train_set, val_set, args.data)
    num_classes, per_rank = len(train_set.classes), args.batch_size // world

    def loader(ds, shuffle):   # DistributedSampler also with 1 process: set_epoch makes every epoch reproducible
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=args.seed)
        return DataLoader(ds, per_rank, sampler=sampler, num_workers=args.workers,
                          pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0)

    # ---- model: frozen backbone + fresh classifier
    from_file = args.pretrained if not args.random_init else ''
    model, key = build_model(arch, kwargs, num_classes, from_file)
    if resume is not None:
        try:
            model.load_state_dict(resume['state_dict'])
        except RuntimeError:
            raise SystemExit(f'error: {args.resume} does not fit {arch} with {num_classes} classes (those of DATA)')
    # the sanity check's reference: the checkpoint itself, read again at the end as the official code does;
    # with no checkpoint (random init, or its file gone since), the backbone as it is now
    snapshot = None if from_file else {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    head = getattr(model, key)
    init_lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), init_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start_epoch, best_acc1 = args.start_epoch, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
        start_epoch, best_acc1 = resume['epoch'], resume['best_acc1']
    protocol = NOT_PAPER if args.cache_features else 'the paper\'s protocol'
    say(f'{arch} {kwargs} <- {args.pretrained or "random init"}{" (random init)" if args.random_init else ""}; '
        f'{num_classes} classes, {len(train_set)} train / {len(val_set)} val images at {args.img_size} px; '
        f'global batch {args.batch_size} = {world} x {per_rank}; base lr {args.lr} -> lr {init_lr:g}; {protocol}')

    # ---- frozen features: val always (it never changes), train too for kNN and the cached mode
    val_feats, val_labels = extract_features(model, loader(val_set, False), device, amp_dtype)
    val_feats, val_labels = val_feats.to(device), val_labels.to(device)
    results = {}
    if args.knn or args.cache_features:
        train_feats, train_labels = extract_features(model, loader(train_eval_set, False), device, amp_dtype)
        train_feats, train_labels = train_feats.to(device), train_labels.to(device)
    if args.knn:
        scores = knn_predict(train_feats, train_labels, val_feats, num_classes, args.knn_k, args.knn_t)
        results['knn_top1'], results['knn_top5'] = accuracy(scores, val_labels, topk=(1, 5))
        say(f'kNN (k={args.knn_k}, T={args.knn_t}) top-1 {results["knn_top1"]:.2f}  top-5 {results["knn_top5"]:.2f}')

    def validate():            # every rank scores its own share of the gathered features; evaluate() sums them
        return evaluate(head, feature_batches(val_feats[rank::world], val_labels[rank::world], 1024), device)

    if args.evaluate:
        stats = validate()
        say(f'val top-1 {stats["top1"]:.2f}  top-5 {stats["top5"]:.2f}  loss {stats["loss"]:.4f}')
        return {**results, 'top1': stats['top1'], 'top5': stats['top5']}

    # ---- train the classifier
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump({**vars(args), 'arch': arch}, f, indent=1)
    train_loader = loader(train_set, True)
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at(epoch, init_lr, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = lr
        torch.manual_seed(args.seed + epoch)            # augmentations depend on the epoch only: exact resume
        if args.cache_features:                        # every rank trains on all features: no communication
            batches = feature_batches(train_feats, train_labels, args.batch_size, args.seed + epoch)
            steps = math.ceil(len(train_feats) / args.batch_size)
        else:
            train_loader.sampler.set_epoch(epoch)
            batches, steps = backbone_batches(model, train_loader, device, amp_dtype), len(train_loader)
        bar = tqdm(batches, total=steps, desc=f'epoch {epoch}', disable=rank != 0 or args.cache_features, leave=False)
        loss_sum = torch.zeros((), device=device)
        for i, (feats, target) in enumerate(bar):
            loss = F.cross_entropy(head(feats), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1 and not args.cache_features:   # what DDP would do, for the only two trained tensors
                for p in head.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
            loss_sum += loss.detach()
            if i % args.print_freq == 0:
                bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{lr:.4g}')
        stats = validate()
        best_acc1 = max(best_acc1, stats['top1'])
        log = {'epoch': epoch, 'lr': lr, 'train_loss': loss_sum.item() / max(steps, 1), 'val_top1': stats['top1'],
               'val_top5': stats['top5'], 'val_loss': stats['loss'], 'best_top1': best_acc1, 'protocol': protocol}
        last = epoch == args.epochs - 1
        if not args.cache_features or last or (epoch + 1) % 10 == 0:     # cached epochs take milliseconds
            say(json.dumps(log))
        if rank == 0:
            with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(log) + '\n')
            ckpt = {'epoch': epoch + 1, 'arch': arch, 'backbone_kwargs': kwargs, 'img_size': args.img_size,
                    'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(), 'best_acc1': best_acc1,
                    'args': dict(vars(args))}
            if not args.cache_features or last:        # cached: writing 10 MB per millisecond epoch would dominate
                save_atomic(ckpt, os.path.join(args.output_dir, 'checkpoint_last.pth'))
            if stats['top1'] >= best_acc1:
                save_atomic(ckpt, os.path.join(args.output_dir, 'model_best.pth'))
    stats = stats or validate()                        # nothing left to train (resumed a finished run)
    reference = snapshot if snapshot is not None else moco.load_backbone(from_file, arch).state_dict()
    sanity_check(model, reference, key)
    say(f'sanity check passed: the backbone (weights and BN statistics) is bit-identical to '
        f'{"the checkpoint" if from_file else "its initial state"}')
    results.update(top1=stats['top1'], top5=stats['top5'], best_top1=best_acc1)
    say(f'linear probe top-1 {stats["top1"]:.2f} (best {best_acc1:.2f})  top-5 {stats["top5"]:.2f}  [{protocol}]')
    return results


# ----------------------------------------------------------------------------- the demo
DEMO_PRESET = dict(cache_features=True, knn=True, epochs=100, batch_size=256, workers=1)


def demo(args):
    """No arguments: probe the demo's checkpoint on the built-in dataset, then the same architecture with
    random weights under the same budget. Cached features + kNN: the fastest route on a 2-core CPU."""
    if not os.path.isfile(DEMO_CHECKPOINT):
        raise SystemExit(f'error: no demo checkpoint at {DEMO_CHECKPOINT}: run `python train_pretrain.py` first')
    defaults = get_args_parser().parse_args([])
    for k, v in DEMO_PRESET.items():                   # flags the user gave win over the preset
        if getattr(args, k) == getattr(defaults, k):
            setattr(args, k, v)
    args.data, args.pretrained = build_demo_dataset(), DEMO_CHECKPOINT
    print(f'demo: {DEMO_CHECKPOINT} on {args.data}; preset {DEMO_PRESET}')
    trained = main(argparse.Namespace(**vars(args)))
    baseline = main(argparse.Namespace(**{**vars(args), 'random_init': True,
                                          'output_dir': os.path.join(args.output_dir, 'random_init')}))
    print(f'demo linear top-1: {trained["top1"]:.1f}% (random init: {baseline["top1"]:.1f}%) [{NOT_PAPER}]')
    print(f'demo kNN top-1: {trained["knn_top1"]:.1f}% (random init: {baseline["knn_top1"]:.1f}%)')
    return {'trained': trained, 'random_init': baseline}


if __name__ == '__main__':
    main(get_args_parser().parse_args())

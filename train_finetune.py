"""End-to-end fine-tuning of a MoCo v3 backbone (Chen, Xie, He, ICCV 2021) with the DeiT recipe the paper used.

The paper's end-to-end fine-tuning results come from the DeiT codebase with DeiT's default settings: ViT-B 83.2%
top-1 after 150 epochs, ViT-L 84.1% after 100 with drop path 0.5, ViT-S 81.4% (paper; official README). Here the
recipe is one readable file: AdamW, lr 5e-4 x batch / 512, wd 0.05, 5 warmup epochs then cosine per iteration,
label smoothing 0.1, MixUp 0.8 / CutMix 1.0, RandAugment, random erasing 0.25, drop path 0.1; optional layer-wise
lr decay, EMA of the weights, gradient clipping. Not ported from DeiT: repeated augmentation, 10 cooldown epochs.

Demo (fine-tunes output/pretrain/checkpoint_last.pth, then the same budget from random init):
    python train_finetune.py
The paper's ViT-B, 8 GPUs:
    torchrun --nproc_per_node=8 train_finetune.py --pretrained vit-b-300ep.pth.tar --epochs 150 /data/imagenet
"""
import argparse
import contextlib
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

import moco
import vit
from train_linear import evaluate, setup_run
from train_pretrain import IMAGENET_MEAN, IMAGENET_STD, build_demo_dataset, check_same_classes, save_atomic

DEMO_CHECKPOINT = 'output/pretrain/checkpoint_last.pth'
# The demo: 5 epochs on 5000 images of 32 px, about 100 s per run on 2 CPU cores. DeiT's MixUp/CutMix, random
# erasing, 0.08 crops and RandAugment 9 are made for 100+ epochs on ImageNet; in a few epochs they hold both runs
# near chance, so the preset softens them.
DEMO_PRESET = dict(epochs=5, batch_size=64, lr=8e-3, warmup_epochs=0.25, workers=1, crop_min=0.35, ra_magnitude=5,
                   mixup=0.0, cutmix=0.0, reprob=0.0)


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 end-to-end fine-tuning (DeiT recipe)', add_help=True)
    p.add_argument('data', nargs='?', default=None, metavar='DATA',
                   help='ImageFolder root with train/ and val/ (default: the built-in demo dataset)')
    g = p.add_argument_group('model')
    g.add_argument('-a', '--arch', '--model', default=None, help="backbone; default: the checkpoint's, else vit_base")
    g.add_argument('--pretrained', '--finetune', default=None,
                   help="pretraining checkpoint (this project's, an official one, or plain backbone weights); "
                        "'' or omitted: train from random init")
    g.add_argument('--random-init', action='store_true',
                   help='build the architecture of --pretrained but keep random weights: the baseline')
    g.add_argument('--img-size', '--input-size', type=int, default=None,
                   help="train and eval crop; eval resizes to img-size*256/224 first (default: checkpoint's, or 224)")
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth of the last block (ViT-L: 0.5)')
    g = p.add_argument_group('optimisation (defaults: DeiT, as the paper)')
    g.add_argument('--epochs', type=int, default=150, help='150 for ViT-B in the paper, 100 for ViT-L')
    g.add_argument('-b', '--batch-size', type=int, default=1024, help='GLOBAL batch, split over processes')
    g.add_argument('--lr', type=float, default=5e-4, help='base lr, scaled by batch/512')
    g.add_argument('--min-lr', type=float, default=1e-5, help='lr at the end of the cosine')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warmup from 0')
    g.add_argument('--wd', '--weight-decay', type=float, default=0.05, dest='weight_decay')
    g.add_argument('--opt-eps', type=float, default=1e-8, help='AdamW epsilon')
    g.add_argument('--layer-decay', type=float, default=None,
                   help='layer-wise lr decay of ViTs (BEiT/MAE; e.g. 0.75): block i gets decay^(depth - i)')
    g.add_argument('--clip-grad', type=float, default=None, help='clip the global gradient norm to this')
    g.add_argument('--model-ema', action='store_true', help='keep and evaluate an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g = p.add_argument_group('regularisation (defaults: DeiT)')
    g.add_argument('--crop-min', type=float, default=0.08, help='smallest RandomResizedCrop area fraction')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.8, help='MixUp alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='CutMix alpha (0: off); one of the two per batch')
    g.add_argument('--ra-num-ops', type=int, default=2, help='RandAugment: ops per image')
    g.add_argument('--ra-magnitude', type=int, default=9, help="RandAugment magnitude, on timm's 0-10 scale")
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g = p.add_argument_group('run')
    g.add_argument('-e', '--evaluate', '--eval', action='store_true',
                   help='only evaluate (e.g. --resume model_best.pth)')
    g.add_argument('--resume', default='', help='a checkpoint of this script, or "auto" (the output dir\'s last)')
    g.add_argument('--output-dir', '--output_dir', default='output/finetune')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', '--num_workers', type=int, default=8, help='loader processes')
    g.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'],
                   help='autocast dtype on CUDA (fp16 adds a GradScaler); a CPU runs fp32')
    g.add_argument('-p', '--print-freq', type=int, default=20)
    return p


# ----------------------------------------------------------------------------- the recipe's pieces
def train_transform(args):
    """DeiT's per-image augmentation, with torchvision's transforms. RandAugment: timm's 'rand-m9' means 9/10 of
    each op's range, torchvision's magnitude 9 of 31 bins only 9/30 of it, so 11 bins give timm's scale (timm's
    magnitude noise mstd0.5 has no torchvision counterpart); fill with the mean colour, as timm does. Random
    erasing with per-pixel normal noise after normalisation is timm's mode 'pixel'."""
    fill = [round(255 * m) for m in IMAGENET_MEAN]
    return v2.Compose([
        v2.RandomResizedCrop(args.img_size, scale=(args.crop_min, 1.0), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandAugment(args.ra_num_ops, args.ra_magnitude, num_magnitude_bins=11, fill=fill),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(args.reprob, value='random'),
    ])


def eval_transform(img_size):
    """DeiT's evaluation: bicubic resize to img_size * 256/224, center crop img_size."""
    return v2.Compose([v2.Resize(int(img_size * 256 / 224), interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(img_size), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def batch_mixer(mixup, cutmix, num_classes):
    """MixUp or CutMix, one of them per batch with equal odds (DeiT: mixup-switch-prob 0.5). (B, 3, H, W), (B,) ->
    the mixed images and soft targets (B, C) whose rows sum to 1; None when both are off."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return v2.RandomChoice(ops) if ops else None


def soft_target_loss(logits, target, smoothing):
    """DeiT's loss. Its timm Mixup smooths the one-hot labels first (1 - eps + eps/C on the class, eps/C elsewhere)
    and then mixes them; SoftTargetCrossEntropy is sum_c -t_c log softmax(z)_c. Mixing is linear and the uniform
    part is the same for both images, so smoothing after mixing is identical: t = (1 - eps) mix(y) + eps / C, which
    is what F.cross_entropy does with probability targets and label_smoothing=eps. Without MixUp/CutMix (class
    indices) it is the ordinary label-smoothed cross-entropy, again as DeiT."""
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def vit_layer_id(name, depth):
    """Layer index for layer-wise lr decay (BEiT, MAE): 0 for the embeddings, i + 1 for block i, depth + 1 above."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups. No weight decay for biases and norm weights (ndim <= 1) and for model.no_weight_decay()
    (position embedding, class token), as DeiT. With layer_decay a group per (layer, decay) whose 'lr_scale' is
    layer_decay ** (depth + 1 - layer id): the head trains at the full lr, the patch embedding at the least."""
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    depth = len(model.blocks) if layer_decay is not None else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer = vit_layer_id(name, depth) if layer_decay is not None else 0
        group = groups.setdefault((layer, no_decay), {
            'params': [], 'weight_decay': 0.0 if no_decay else weight_decay,
            'lr_scale': layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0})
        group['params'].append((name, p))          # named: the optimizer keeps 'param_names' per group
    return list(groups.values())


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warmup from 0, then half-cosine from lr to min_lr; a pure function of the iteration."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


# ----------------------------------------------------------------------------- the model
def read_meta(path):
    """(arch, backbone_kwargs) that a checkpoint records ((None, {}) for bare weights). mmap: no copy is made."""
    if not os.path.isfile(path):
        raise SystemExit(f'error: {path} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f'error: {path} is not a readable checkpoint ({type(e).__name__})')
    if not isinstance(ckpt, dict):
        return None, {}
    return ckpt.get('arch'), dict(ckpt.get('backbone_kwargs') or {})


def reset_head(model, num_classes):
    """A fresh classifier. ViT: trunc-normal std 0.02, zero bias: the head DeiT's model had when the paper loaded
    its converted checkpoint (timm 0.3.2's ViT init; MAE uses 2e-5). ResNet: PyTorch's default, as torchvision."""
    if isinstance(model, vit.VisionTransformer):
        model.head = nn.Linear(model.num_features, num_classes)
        nn.init.trunc_normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
    else:
        model.fc = nn.Linear(model.num_features, num_classes)
    return model


def build_model(args, num_classes):
    """The classifier to fine-tune -> (model, arch, backbone_kwargs). A ViT is rebuilt at --img-size with drop path,
    a trainable patch projection and a LEARNED position embedding initialised from the checkpoint's (sin-cos
    recomputed or learned interpolated for a new grid by vit.py): the paper's DeiT ViT trains its pos_embed too."""
    saved_arch, kwargs = read_meta(args.pretrained) if args.pretrained else (None, {})
    if args.arch and saved_arch and args.arch != saved_arch:
        raise SystemExit(f'error: --arch {args.arch}, but {args.pretrained} holds a {saved_arch}')
    arch = args.arch or saved_arch or 'vit_base'
    if arch not in moco.ARCHS:
        raise SystemExit(f'error: unknown arch {arch!r}; choose one of: {", ".join(moco.ARCHS)}')
    for k in ('num_classes', 'zero_init_residual', 'stop_grad_conv1', 'drop_path_rate'):
        kwargs.pop(k, None)                       # settings of the pretraining run, not of the architecture
    if arch in vit.ARCHS:
        kwargs.update(img_size=args.img_size or kwargs.get('img_size') or 224, drop_path_rate=args.drop_path,
                      pos_embed='none' if kwargs.get('pos_embed') == 'none' else 'learned')
    try:
        model = reset_head(moco.build_backbone(arch, num_classes=num_classes, **kwargs), num_classes)
    except (ValueError, TypeError) as e:
        raise SystemExit(f'error: {e}')
    if args.pretrained and not args.random_init:
        try:
            src = moco.load_backbone(args.pretrained, arch)   # built as pretrained, classifier = identity
        except ValueError as e:
            raise SystemExit(f'error: {e}')
        state = src.state_dict()
        if kwargs.get('pos_embed') == 'learned':
            state['pos_embed'] = src.pos_embed_for(model.grid, model.grid).detach()  # (1, 1 + L, D)
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = 'head' if arch in vit.ARCHS else 'fc'
        assert set(missing) == {f'{head}.weight', f'{head}.bias'} and not unexpected, (missing, unexpected)
    return model, arch, {**kwargs, 'num_classes': num_classes}


def load_resume(path):
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'error: --resume {path} is not a readable checkpoint ({type(e).__name__})')
    if not isinstance(ckpt, dict) or 'best_top1' not in ckpt or 'backbone_kwargs' not in ckpt:
        raise SystemExit(f'error: --resume {path} is no checkpoint of train_finetune.py '
                         f'(a pretraining checkpoint goes to --pretrained)')
    return ckpt


# ----------------------------------------------------------------------------- the run
def main(args):
    if args.data is None and args.pretrained is None and not args.resume:
        return demo(args)
    rank, world, local_rank, device, amp_dtype, say = setup_run(args)
    resume = load_resume(args.resume) if args.resume else None
    if args.data is None:
        args.data = build_demo_dataset()
    for split in ('train', 'val'):
        if not os.path.isdir(os.path.join(args.data, split)):
            raise SystemExit(f'error: {os.path.join(args.data, split)} is not a directory: DATA must hold '
                             f'train/ and val/ in ImageFolder layout')
    if args.img_size is None:
        saved = resume['backbone_kwargs'] if resume else read_meta(args.pretrained)[1] if args.pretrained else {}
        args.img_size = saved.get('img_size') or 224
    torch.manual_seed(args.seed)

    # ---- data
    try:
        train_set = datasets.ImageFolder(os.path.join(args.data, 'train'), train_transform(args))
        val_set = datasets.ImageFolder(os.path.join(args.data, 'val'), eval_transform(args.img_size))
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f'error: {e}')
    check_same_classes(train_set, val_set, args.data)
    num_classes, per_rank = len(train_set.classes), args.batch_size // world
    if len(train_set) < args.batch_size:
        raise SystemExit(f'error: batch {args.batch_size} is larger than the {len(train_set)} training images')
    train_sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, per_rank, sampler=train_sampler, num_workers=args.workers,
                              pin_memory=device.type == 'cuda', drop_last=True)
    # evaluate() all-reduces sums: each rank scores every world-th image, each image exactly once
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), per_rank,
                            num_workers=args.workers, pin_memory=device.type == 'cuda')

    # ---- model, optimizer, EMA
    if resume is not None:
        arch, kwargs = resume['arch'], resume['backbone_kwargs']
        model = moco.build_backbone(arch, **kwargs)
        model.load_state_dict(resume['state_dict'])
    else:
        model, arch, kwargs = build_model(args, num_classes)
    if kwargs['num_classes'] != num_classes:
        raise SystemExit(f'error: the checkpoint has {kwargs["num_classes"]} classes, {args.data} {num_classes}')
    if args.layer_decay is not None and arch not in vit.ARCHS:
        raise SystemExit(f'error: --layer-decay is defined for ViTs only, not {arch}')
    model.to(device)
    lr = args.lr * args.batch_size / 512
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.layer_decay), lr=lr, eps=args.opt_eps, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.model_ema_decay), use_buffers=True) \
        if args.model_ema else None
    start_epoch, best_top1 = 0, 0.0
    if resume is not None:
        if ema is not None and resume.get('ema') is not None:
            ema.load_state_dict(resume['ema'])
        if not args.evaluate:
            if resume.get('optimizer') is None:
                raise SystemExit(f'error: {args.resume} holds no optimizer state: resume from checkpoint_last.pth')
            optimizer.load_state_dict(resume['optimizer'])
            if resume['scaler'] is not None:
                scaler.load_state_dict(resume['scaler'])
            start_epoch, best_top1 = resume['epoch'], resume['best_top1']
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda' else None) \
        if world > 1 else model
    mix = batch_mixer(args.mixup, args.cutmix, num_classes)
    steps_per_epoch = len(train_loader)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    source = 'random init' if not args.pretrained or args.random_init else args.pretrained
    say(f'{arch} {kwargs} <- {source}; {num_classes} classes, {len(train_set)} train / {len(val_set)} val '
        f'images at {args.img_size} px; global batch {args.batch_size} = {world} x {per_rank}; '
        f'base lr {args.lr:g} -> lr {lr:g} (x batch/512); {args.epochs} epochs of {steps_per_epoch} steps')

    def validate():
        stats = evaluate(model, val_loader, device, amp_dtype)
        if ema is not None:
            stats.update({f'ema_{k}': v for k, v in evaluate(ema.module, val_loader, device, amp_dtype).items()})
        return stats

    if args.evaluate:
        stats = validate()
        say(json.dumps(stats))
        return stats
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump({**vars(args), 'arch': arch, 'backbone_kwargs': kwargs}, f, indent=1)

    # ---- the loop
    step, stats = start_epoch * steps_per_epoch, {}
    for epoch in range(start_epoch, args.epochs):
        # every random draw of the epoch (worker seeds, MixUp/CutMix, drop path) from (seed, epoch, rank): exact resume
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        train_sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(train_loader, desc=f'epoch {epoch}', disable=rank != 0, leave=False, dynamic_ncols=True)
        for images, target in bar:
            step_lr = lr_at(step, total, warmup, lr, args.min_lr)
            for group in optimizer.param_groups:
                group['lr'] = step_lr * group['lr_scale']
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            if mix is not None:
                images, target = mix(images, target)                          # target (B, C), rows sum to 1
            with autocast():
                loss = soft_target_loss(ddp(images), target, args.smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            loss_sum += loss.detach()
            if step % args.print_freq == 0:                                   # the only host syncs of the loop
                bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{step_lr:.3g}')
                if rank == 0:
                    with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
                        f.write(json.dumps({'epoch': epoch, 'step': step, 'loss': loss.item(), 'lr': step_lr}) + '\n')
        if world > 1:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (steps_per_epoch * world)
        if not math.isfinite(train_loss):
            raise SystemExit(f'error: the loss is {train_loss} in epoch {epoch}; the last good checkpoint is kept')
        stats = validate()
        best_top1 = max(best_top1, stats['top1'])
        log = {'epoch': epoch, 'step': step, 'train_loss': train_loss, **{f'val_{k}': v for k, v in stats.items()},
               'best_top1': best_top1}
        say(json.dumps(log))
        if rank == 0:
            with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(log) + '\n')
            # the bare classifier (not DDP's wrapper): its keys are timm's ViT / torchvision's ResNet layout
            ckpt = {'state_dict': model.state_dict(), 'arch': arch, 'backbone_kwargs': kwargs, 'epoch': epoch + 1,
                    'step': step, 'top1': stats['top1'], 'best_top1': best_top1, 'classes': train_set.classes,
                    'args': dict(vars(args)), 'optimizer': optimizer.state_dict(),
                    'scaler': scaler.state_dict() if scaler.is_enabled() else None,
                    'ema': ema.state_dict() if ema is not None else None}
            save_atomic(ckpt, os.path.join(args.output_dir, 'checkpoint_last.pth'))
            if stats['top1'] >= best_top1:
                save_atomic({k: v for k, v in ckpt.items() if k not in ('optimizer', 'scaler')},
                            os.path.join(args.output_dir, 'model_best.pth'))
    stats = stats or validate()                                               # resumed a finished run
    say(f'fine-tuned top-1 {stats["top1"]:.2f} (best {best_top1:.2f})  top-5 {stats["top5"]:.2f}')
    return {**stats, 'best_top1': best_top1}


# ----------------------------------------------------------------------------- the demo
def demo(args):
    """No arguments: fine-tune the demo's pretraining checkpoint on the built-in dataset, then train the same
    architecture from random init with the same budget, and print both."""
    if not os.path.isfile(DEMO_CHECKPOINT):
        raise SystemExit(f'error: no demo checkpoint at {DEMO_CHECKPOINT}: run `python train_pretrain.py` first')
    defaults = get_args_parser().parse_args([])
    for k, v in DEMO_PRESET.items():                                           # flags the user gave win
        if getattr(args, k) == getattr(defaults, k):
            setattr(args, k, v)
    args.data, args.pretrained = build_demo_dataset(), DEMO_CHECKPOINT
    print(f'demo: fine-tune {DEMO_CHECKPOINT} on {args.data}; preset {DEMO_PRESET}')
    tuned = main(argparse.Namespace(**vars(args)))
    scratch = main(argparse.Namespace(**{**vars(args), 'random_init': True,
                                         'output_dir': os.path.join(args.output_dir, 'random_init')}))
    print(f'demo fine-tuned top-1: {tuned["top1"]:.1f}% (random init, same budget: {scratch["top1"]:.1f}%)')
    return {'pretrained': tuned, 'random_init': scratch}


if __name__ == '__main__':
    main(get_args_parser().parse_args())

"""End-to-end fine-tuning of a MoCo v3 backbone (Chen, Xie, He,
ICCV 2021: Sec. 5, Table 4; transfer as the official transfer/README.md)
with DeiT's recipe, as the paper; its defaults are the flags'.

    python train_finetune.py         # the demo: the demo checkpoint, then random init; CPU ok
    torchrun --nproc_per_node=8 train_finetune.py --pretrained vit-b.pth.tar --epochs 150 /imagenet
    torchrun --nproc_per_node=8 train_finetune.py --preset cifar10 --pretrained vit-b.pth.tar /cifar

Reads top to bottom: arguments -> the recipe's pieces -> `fine_tune`
(data -> model -> optimizer -> resume -> loop -> save) -> `main`, which
sets up the processes and runs one fine-tuning (the demo: two).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import augment
import checkpoint
import data
import evaluation
import launch
import moco
import vit
from launch import UserError

# ----------------------------------------------------------------------------- arguments
DEMO_CHECKPOINT = 'output/pretrain/checkpoint_last.pth'
# The demo: 5 epochs on 5000 32-px images, ~100 s a run on 2 CPU cores.
# DeiT's MixUp/CutMix, erasing, small crops, RandAugment 9, repeated
# augmentation (for 100+ ImageNet epochs): softened. No warm-up: the lr
# steps once an epoch, and a warm-up epoch would spend one of the five at
# --warmup-lr.
DEMO_PRESET = dict(
    data=data.DEMO_ROOT, pretrained=DEMO_CHECKPOINT, epochs=5, batch_size=64,
    lr=8e-3, warmup_epochs=0, workers=1, crop_min=0.35, ra_magnitude=5,
    mixup=0.0, cutmix=0.0, reprob=0.0, repeated_aug=False)
# The official transfer recipes: DeiT's main.py, the flags of
# transfer/README.md, 8 GPUs x 128, DeiT's --warmup-lr and --min-lr (the
# cosine ends at 1.7% of the actual lr 6e-4). Its transfer/datasets.py
# makes the views: RandomResizedCrop (0.05-1, bilinear) + flip; resize
# 256/224 and centre crop to test. No RandAugment, no erasing (the Flowers
# --reprob 0.25 had no effect).
TRANSFER = dict(
    batch_size=1024, lr=3e-4, weight_decay=0.1, epochs=100, warmup_epochs=3,
    reprob=0.0, repeated_aug=False, crop_min=0.05, ra_num_ops=0,
    interpolation='bilinear')
PRESETS = {
    'demo': DEMO_PRESET,
    'cifar10': dict(TRANSFER, dataset='cifar10', drop_path=0.1,
                    mixup=0.8, cutmix=1.0),
    'cifar100': dict(TRANSFER, dataset='cifar100', drop_path=0.1,
                     mixup=0.5, cutmix=1.0),
    'flowers102': dict(TRANSFER, dataset='flowers102', weight_decay=0.3,
                       drop_path=0.1, mixup=0.0, cutmix=0.0),
    'pets': dict(TRANSFER, dataset='pets', drop_path=0.0,
                 mixup=0.8, cutmix=0.0),
}


def get_args_parser():
    p = argparse.ArgumentParser(
        'MoCo v3 end-to-end fine-tuning (DeiT recipe)', allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help="the image set's root; omitted only by the demo "
                        '(or --preset demo)')
    p.add_argument('--preset', choices=PRESETS,
                   help='demo: minutes on a CPU; others: official transfer '
                        'recipes; flags win')
    p.add_argument('--dataset', default='folder', choices=data.DATASETS,
                   help='folder: DATA/{train,val}/<class>/<image>; '
                        "others: torchvision's layout")

    g = p.add_argument_group('model')
    g.add_argument('-a', '--arch', '--model', choices=moco.ARCHS, metavar='ARCH',
                   help="None: the checkpoint's, else vit_base")
    g.add_argument('--pretrained', '--finetune',
                   help='MoCo checkpoint (ours, official) or backbone weights; '
                        'none: random init')
    g.add_argument('--random-init', action='store_true',
                   help='build the architecture of --pretrained, keep random '
                        'weights: the baseline')
    g.add_argument('--img-size', '--input-size', type=int,
                   help='crop size, resized x 256/224 to test; '
                        "None: the checkpoint's, else 224")
    g.add_argument('--drop-path', type=float, default=0.1,
                   help='stochastic depth (ViT-L: 0.5)')

    g = p.add_argument_group(
        'optimisation (defaults: DeiT, as the paper)',
        "the lr schedule is DeiT's, timm's CosineLRScheduler as DeiT "
        'sets it up: one lr an epoch, a linear warm-up from --warmup-lr, '
        'then a half-cosine over ALL epochs (warm-up included) to --min-lr')
    g.add_argument('--epochs', type=int, default=150,
                   help='paper: 150 ViT-B, 100 ViT-L')
    g.add_argument('-b', '--batch-size', type=int, default=1024,
                   help='GLOBAL batch')
    g.add_argument('--lr', type=float, default=5e-4,
                   help='base lr; the actual is lr x batch / 512')
    g.add_argument('--warmup-epochs', type=float, default=5,
                   help="DeiT's: epochs of linear warm-up")
    g.add_argument('--warmup-lr', type=float, default=1e-6,
                   help="DeiT's: the lr of epoch 0, where the warm-up starts")
    g.add_argument('--min-lr', type=float, default=1e-5,
                   help="DeiT's: the lr at the end of the cosine")
    g.add_argument('--wd', '--weight-decay', type=float, default=0.05,
                   dest='weight_decay')
    g.add_argument('--opt-eps', type=float, default=1e-8,
                   help='AdamW epsilon')
    g.add_argument('--layer-decay', type=float,
                   help='ViT layer-wise lr decay (BEiT, MAE; e.g. 0.75): '
                        'decay^(depth-i), block i')
    g.add_argument('--clip-grad', type=float,
                   help='clip the global gradient norm to this')
    g.add_argument('--model-ema', action='store_true',
                   help='keep and test an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996)

    g = p.add_argument_group('regularisation (defaults: DeiT)')
    g.add_argument('--crop-min', type=float, default=0.08,
                   help='smallest RandomResizedCrop area')
    g.add_argument('--interpolation', default='bicubic',
                   choices=('bicubic', 'bilinear'),
                   help='crops, RandAugment, test resize: DeiT bicubic, '
                        'transfer bilinear')
    g.add_argument('--smoothing', type=float, default=0.1,
                   help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.8,
                   help='MixUp alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0,
                   help='CutMix alpha (0: off); one a batch')
    g.add_argument('--ra-num-ops', type=int, default=2,
                   help='RandAugment ops per image (0: off)')
    g.add_argument('--ra-magnitude', type=float, default=9,
                   help="RandAugment on timm's 0-10 scale")
    g.add_argument('--ra-mstd', type=float, default=0.5,
                   help='std of the magnitude noise')
    g.add_argument('--reprob', type=float, default=0.25,
                   help='random erasing probability')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction,
                   default=True,
                   help="DeiT's: 3 augmentations of each image drawn, "
                        'on different processes')

    g = p.add_argument_group('run')
    g.add_argument('-e', '--evaluate', '--eval', action='store_true',
                   help='test --resume only')
    g.add_argument('--resume', default='',
                   help="a checkpoint of this script; 'auto': the last one")
    g.add_argument('--output-dir', '--output_dir', default='output/finetune')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', '--num_workers', type=int, default=8,
                   help='per process')
    g.add_argument('--dtype', choices=launch.DTYPES,
                   help='autocast dtype (fp16 adds a GradScaler); default: '
                        'bf16 on GPUs and on CPUs with native bf16, '
                        'fp32 on other CPUs')
    g.add_argument('-p', '--print-freq', type=int, default=20,
                   help='log every N steps')
    return p


def parse_args(argv=None):
    """get_args_parser() with the --preset (no arguments: demo) as
    defaults, set before the final parse: `--preset cifar10 --help` shows
    what will run, and a flag the user gives always wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--preset')
    preset = pre.parse_known_args(argv)[0].preset
    if not argv:
        preset = 'demo'
    parser = get_args_parser()
    parser.set_defaults(**PRESETS.get(preset, {}), preset=preset)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- the recipe's pieces
def soft_target_loss(logits, target, smoothing):
    """DeiT's loss. Its timm Mixup smooths the one-hot labels (1 - eps +
    eps/C on the class, eps/C elsewhere), then mixes;
    SoftTargetCrossEntropy: sum_c -t_c log softmax(z)_c. Mixing is linear,
    the uniform part the same for both images: smoothing after mixing is
    the same, t = (1 - eps) mix(y) + eps / C, F.cross_entropy's
    label_smoothing. Class indices: DeiT's plain smoothing."""
    return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def vit_layer_id(name, depth):
    """Layer id for layer-wise lr decay (BEiT, MAE): embeddings 0,
    block i i+1, others depth+1."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups of plain parameters (their names in 'names', for
    people). No weight decay for biases, norm weights (ndim <= 1) and
    model.no_weight_decay() (position embedding, class token), as DeiT.
    layer_decay (ViT): 'lr_scale' layer_decay ** (depth + 1 - layer id),
    the head's 1."""
    is_vit = isinstance(model, vit.VisionTransformer)
    if layer_decay is not None and not is_vit:
        raise UserError(f'--layer-decay is defined for ViTs only, '
                        f'not {type(model).__name__}')
    skip = model.no_weight_decay() if is_vit else set()
    depth = len(model.blocks) if layer_decay is not None else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer, lr_scale = 0, 1.0
        if layer_decay is not None:
            layer = vit_layer_id(name, depth)
            lr_scale = layer_decay ** (depth + 1 - layer)
        if (layer, no_decay) not in groups:
            groups[layer, no_decay] = dict(
                params=[], names=[], lr_scale=lr_scale,
                weight_decay=0.0 if no_decay else weight_decay)
        groups[layer, no_decay]['params'].append(p)
        groups[layer, no_decay]['names'].append(name)
    return list(groups.values())


def lr_at(epoch, lr, epochs, warmup_epochs, warmup_lr, min_lr):
    """The lr of epoch `epoch` (0, 1, ...): DeiT's schedule, timm's
    CosineLRScheduler as DeiT's create_scheduler sets it up (t_in_epochs,
    t_initial = epochs, warmup_t = warmup_epochs, warmup_prefix False).
    A linear warm-up from warmup_lr, then a half-cosine from lr to min_lr
    over ALL epochs, the warm-up's included: the cosine is under way when
    a warm-up ends, so lr itself never runs (ImageNet's epoch 5 of 150
    runs 0.3% below it). DeiT's main.py steps the scheduler with
    the epoch just done, so its epoch e >= 1 runs at the lr of e - 1 (and
    epoch 1 repeats epoch 0's); here epoch e runs at its own, as in timm's
    train.py. A pure function of the epoch: exact resume."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    cosine = 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return min_lr + (lr - min_lr) * cosine


# ----------------------------------------------------------------------------- data and model
def data_loaders(args, run):
    """-> (train set, val set, train loader, val loader) of this process.
    Val: every world_size-th image, each once (evaluation.evaluate
    all-reduces the sums)."""
    bicubic = args.interpolation == 'bicubic'
    batch = args.batch_size // run.world_size                # per process
    pin_memory = run.device.type == 'cuda'
    train_view = augment.finetune_transform(
        args.img_size, args.crop_min, args.ra_num_ops, args.ra_magnitude,
        args.ra_mstd, args.reprob, bicubic)
    val_view = augment.eval_transform(args.img_size, bicubic)
    train_set = data.build_dataset(args.dataset, args.data, 'train', train_view)
    val_set = data.build_dataset(args.dataset, args.data, 'val', val_view)
    data.check_same_classes(train_set, val_set, args.data)
    if args.repeated_aug:
        sampler = data.RepeatedAugSampler(train_set, run.world_size, run.rank, args.seed)
    else:
        sampler = DistributedSampler(train_set, run.world_size, run.rank,
                                     seed=args.seed, drop_last=True)
    if len(sampler) < batch:                  # repeated augmentation: whole 256s only
        raise UserError(f'{len(train_set)} training images give each process '
                        f'{len(sampler)} an epoch, fewer than its batch of {batch} '
                        f'(see --no-repeated-aug)')
    loader = DataLoader(train_set, batch, sampler=sampler,
                        num_workers=args.workers, pin_memory=pin_memory,
                        drop_last=True)
    val_share = Subset(val_set, range(run.rank, len(val_set), run.world_size))
    val_loader = DataLoader(val_share, batch, num_workers=args.workers,
                            pin_memory=pin_memory)
    return train_set, val_set, loader, val_loader


def read_checkpoints(args, resume_path):
    """-> (the checkpoint of this script at resume_path, or None; the
    --pretrained checkpoint as checkpoint.read returns it, or {}: none
    given, or resuming, which needs none)."""
    resume = None
    if resume_path:
        resume = checkpoint.read(resume_path)
        if 'best_top1' not in resume:
            raise UserError(f'--resume {resume_path} is no checkpoint of train_finetune.py '
                            '(a pretraining checkpoint goes to --pretrained)')
    pretrained = {}
    if args.pretrained and resume is None:
        pretrained = checkpoint.read(args.pretrained)
    return resume, pretrained


def build_model(args, pretrained, num_classes):
    """The classifier -> (model, arch, backbone_kwargs); pretrained: the
    --pretrained checkpoint (read_checkpoints), {} for none. A ViT is
    rebuilt at --img-size with drop path, a trainable patch projection and
    a LEARNED position embedding from the checkpoint's (vit.py adapts it to
    the grid): DeiT's ViT trains its pos_embed. Its head: trunc-normal
    std 0.02, zero bias, as DeiT's (timm 0.3.2); a ResNet's: PyTorch's."""
    saved_arch = pretrained.get('arch')
    if args.arch and saved_arch and args.arch != saved_arch:
        raise UserError(f'--arch {args.arch}, but {args.pretrained} holds a {saved_arch}')
    arch = args.arch or saved_arch or 'vit_base'
    if arch not in moco.ARCHS:
        raise UserError(f'unknown arch {arch!r}; choose one of: {", ".join(moco.ARCHS)}')
    # The checkpoint's architecture, without the settings of its training
    # (the list that checkpoint.load_backbone applies).
    saved = pretrained.get('backbone_kwargs') or {}
    kwargs = {k: v for k, v in saved.items() if k not in checkpoint.TRAINING_ONLY}
    if arch in vit.ARCHS:
        pos_embed = 'none' if kwargs.get('pos_embed') == 'none' else 'learned'
        kwargs.update(img_size=args.img_size, drop_path_rate=args.drop_path,
                      pos_embed=pos_embed)
    model = moco.ARCHS[arch](num_classes=num_classes, **kwargs)
    if arch in vit.ARCHS:                               # its bias: 0 already (vit.py)
        nn.init.trunc_normal_(model.head.weight, std=0.02)
    if args.pretrained and not args.random_init:
        # as pretrained, classifier = identity
        source = checkpoint.load_backbone(args.pretrained, arch)
        state = source.state_dict()
        if kwargs.get('pos_embed') == 'learned':        # (1, 1 + L, D) for this grid
            grid = model.grid
            state['pos_embed'] = source.pos_embed_for(grid, grid).detach()
        missing, unexpected = model.load_state_dict(state, strict=False)
        # load_backbone checked all the others
        head = 'head' if arch in vit.ARCHS else 'fc'
        fresh = {f'{head}.weight', f'{head}.bias'}
        assert set(missing) == fresh and not unexpected, missing
    return model, arch, {**kwargs, 'num_classes': num_classes}


def restore(resume, path, optimizer, scaler, ema, args):
    """Load the EMA, optimizer, scaler state of the checkpoint `resume`
    -> (epochs done, best top-1 so far)."""
    if ema is not None and resume.get('ema') is not None:
        ema.load_state_dict(resume['ema'])
    if resume.get('optimizer') is not None:
        optimizer.load_state_dict(resume['optimizer'])
        if resume.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(resume['scaler'])
    elif not args.evaluate:
        raise UserError(f'{path} holds no optimizer state: '
                        f'resume from checkpoint_last.pth')
    return resume['epoch'], resume['best_top1']


def validate(model, ema, val_loader, device, amp):
    """Top-1, top-5 (%) and the loss on the val images; the EMA's as
    ema_*."""
    stats = evaluation.evaluate(model, val_loader, device, amp)
    if ema is not None:
        ema_stats = evaluation.evaluate(ema.module, val_loader, device, amp)
        stats.update({f'ema_{k}': v for k, v in ema_stats.items()})
    return stats


def append_json(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(model, optimizer, loader, epoch, lr, run, args, *,
                    amp, scaler, ema, mixer):
    """One pass over this process's share at lr (times each group's
    lr_scale) -> the mean loss over all processes; every print_freq steps,
    a line of log."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    raw_model = getattr(model, 'module', model)
    model.train()
    steps = len(loader)
    log_path = os.path.join(args.output_dir, 'log.jsonl')
    # summed on the device: no sync per step
    loss_sum = torch.zeros((), device=run.device)
    desc = f'epoch {epoch + 1}/{args.epochs}'
    bar = tqdm(loader, desc, disable=not run.show_bar, leave=False)
    for i, (images, target) in enumerate(bar):
        images = images.to(run.device, non_blocking=True)  # (B, 3, H, W)
        target = target.to(run.device, non_blocking=True)  # (B,)
        if mixer is not None:
            images, target = mixer(images, target)         # target (B, C), rows sum to 1
        with torch.autocast(run.device.type, amp, enabled=amp is not None):
            loss = soft_target_loss(model(images), target, args.smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update_parameters(raw_model)
        loss_sum += loss.detach()

        step = epoch * steps + i + 1                       # steps done
        if step % args.print_freq == 0 and run.is_main:    # the only host syncs
            row = dict(epoch=epoch + 1, step=step, loss=loss.item(), lr=lr)
            append_json(log_path, row)
            bar.set_postfix(loss=f'{row["loss"]:.4f}', lr=f'{lr:.3g}')
            if not run.show_bar:                 # a log file: plain lines, no bar frames
                print(f'{desc} step {i + 1}/{steps}: loss {row["loss"]:.4f}, lr {lr:.3g}')
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (steps * run.world_size)


# ----------------------------------------------------------------------------- one fine-tuning
def fine_tune(args, run):
    """One fine-tuning run on this process group (main's `run`) -> the
    val top-1 / top-5 (%) and loss (the EMA's as ema_*), best_top1."""
    amp = launch.amp_dtype(args.dtype, run.device)
    if args.data is None:
        raise UserError("DATA is required: the image set's root (see --dataset); for the "
                        'built-in demo run `python train_finetune.py` alone, or add '
                        '--preset demo')
    if args.batch_size % run.world_size:
        raise UserError(f'batch size {args.batch_size} is not divisible by '
                        f'{run.world_size} processes')
    resume_path = args.resume
    if resume_path == 'auto':                          # the output dir's last, if any
        last = os.path.join(args.output_dir, 'checkpoint_last.pth')
        resume_path = last if os.path.isfile(last) else ''
    resume, pretrained = read_checkpoints(args, resume_path)
    if args.img_size is None:                          # the checkpoint's, or 224
        recorded = (resume or pretrained).get('backbone_kwargs') or {}
        args.img_size = recorded.get('img_size') or 224

    # ------------------------------------------------------------------------- data
    if args.data == data.DEMO_ROOT and run.is_main:    # the built-in set, made once ...
        data.build_demo_dataset(args.data)
    launch.barrier()                                   # ... before any process reads it
    train_set, val_set, loader, val_loader = data_loaders(args, run)
    num_classes = len(train_set.classes)

    # ------------------------------------------------------------------------- model
    torch.manual_seed(args.seed)                       # the same fresh head everywhere
    if resume is not None:                             # this script's: the classifier
        arch, kwargs = resume['arch'], resume['backbone_kwargs']
        model = moco.ARCHS[arch](**kwargs)
        checkpoint.load_weights(model, resume['state_dict'], resume_path)
    else:
        model, arch, kwargs = build_model(args, pretrained, num_classes)
    if kwargs['num_classes'] != num_classes:
        raise UserError(f'the checkpoint has {kwargs["num_classes"]} classes, '
                        f'DATA {num_classes}')
    raw_model = model.to(run.device)                   # the bare module: saved
    model = raw_model
    ema = None
    if args.model_ema:                                 # weights and BN statistics
        average = get_ema_multi_avg_fn(args.model_ema_decay)
        ema = AveragedModel(raw_model, multi_avg_fn=average, use_buffers=True)
    if run.world_size > 1:
        device_ids = [run.device.index] if run.device.type == 'cuda' else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids)

    # ------------------------------------------------------------------------- optimizer
    actual_lr = args.lr * args.batch_size / 512        # DeiT's linear scaling rule
    groups = param_groups(raw_model, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=actual_lr, eps=args.opt_eps)
    fp16 = amp == torch.float16                        # bf16 needs no scaler
    scaler = torch.amp.GradScaler('cuda', enabled=fp16)
    mixer = augment.batch_mixer(args.mixup, args.cutmix, num_classes)   # None: both off

    # ------------------------------------------------------------------------- resume
    start_epoch, best_top1 = 0, 0.0
    if resume is not None:
        start_epoch, best_top1 = restore(resume, resume_path, optimizer,
                                         scaler, ema, args)
    end_epoch = args.epochs
    if args.evaluate:                                  # -e: test only
        end_epoch = start_epoch

    source = args.pretrained
    if not args.pretrained or args.random_init:
        source = 'random init'
    batch = args.batch_size // run.world_size
    run.say(f'{arch} {kwargs} <- {source}; {args.dataset} {args.data}: '
            f'{num_classes} classes, {len(train_set)} / {len(val_set)} train / val '
            f'images at {args.img_size} px')
    run.say(f'global batch {args.batch_size} = {run.world_size} x {batch}; '
            f'base lr {args.lr:g}, actual {actual_lr:g} (x {args.batch_size}/512); '
            f'{launch.dtype_name(amp)} on {run.device}; '
            f'{args.epochs} x {len(loader)} steps')
    if args.min_lr > actual_lr:
        run.say(f'note: --min-lr {args.min_lr:g} is above the actual lr '
                f'{actual_lr:g}: the cosine rises to it')
    log_path = os.path.join(args.output_dir, 'log.jsonl')
    if run.is_main and not args.evaluate:
        os.makedirs(args.output_dir, exist_ok=True)
        config = dict(vars(args), arch=arch, dtype_used=launch.dtype_name(amp))
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump(config, f, indent=1)

    # ------------------------------------------------------------------------- loop
    stats = {}
    for epoch in range(start_epoch, end_epoch):
        # The data order and every random draw (augmentations, MixUp/CutMix,
        # drop path) depend on (seed, epoch, rank) alone: a resumed run
        # replays what an uninterrupted one would see.
        loader.sampler.set_epoch(epoch)
        torch.manual_seed((args.seed * 10 ** 4 + epoch) * 10 ** 4 + run.rank)
        lr = lr_at(epoch, actual_lr, args.epochs, args.warmup_epochs,
                   args.warmup_lr, args.min_lr)
        train_loss = train_one_epoch(model, optimizer, loader, epoch, lr, run, args,
                                     amp=amp, scaler=scaler, ema=ema, mixer=mixer)
        # before any save: the last checkpoint is a good one
        if not math.isfinite(train_loss):
            raise UserError(f'the loss is {train_loss} in epoch {epoch + 1}; stopped, the '
                            f'last good checkpoint is in {args.output_dir}')
        stats = validate(raw_model, ema, val_loader, run.device, amp)
        best_top1 = max(best_top1, stats['top1'])
        row = dict(epoch=epoch + 1, step=(epoch + 1) * len(loader), lr=lr,
                   train_loss=train_loss,
                   **{f'val_{k}': v for k, v in stats.items()},
                   best_top1=best_top1)
        run.say(json.dumps(row))

        # --------------------------------------------------------------------- save
        if run.is_main:
            append_json(log_path, row)
            # the bare classifier, not DDP's wrapper: timm's ViT / torchvision's ResNet keys
            ckpt = dict(
                state_dict=raw_model.state_dict(), arch=arch, backbone_kwargs=kwargs,
                epoch=epoch + 1, step=row['step'], top1=stats['top1'],
                best_top1=best_top1, classes=list(train_set.classes), args=vars(args),
                optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None,
                ema=ema.state_dict() if ema is not None else None)
            checkpoint.save(ckpt, os.path.join(args.output_dir, 'checkpoint_last.pth'))
            if stats['top1'] >= best_top1:
                best = {k: v for k, v in ckpt.items() if k not in ('optimizer', 'scaler')}
                checkpoint.save(best, os.path.join(args.output_dir, 'model_best.pth'))

    if not stats:                                      # -e, or a finished run resumed
        stats = validate(raw_model, ema, val_loader, run.device, amp)
    run.say(f'top-1 {stats["top1"]:.2f} (best {best_top1:.2f}), '
            f'top-5 {stats["top5"]:.2f}')
    return {**stats, 'best_top1': best_top1}


# ----------------------------------------------------------------------------- the demo
def demo(args, run):
    """--preset demo (the default without arguments): fine-tune the
    pretraining demo's checkpoint on the built-in set, then the same
    architecture from random init, same budget; print both."""
    no_checkpoint = not os.path.isfile(DEMO_CHECKPOINT)
    if args.pretrained == DEMO_CHECKPOINT and no_checkpoint:
        raise UserError(f'no demo checkpoint at {DEMO_CHECKPOINT}: '
                        f'run `python train_pretrain.py` first')
    run.say(f'demo: fine-tune {args.pretrained} on {args.data}, '
            f'then the same from random init')
    tuned = fine_tune(argparse.Namespace(**vars(args)), run)
    out = os.path.join(args.output_dir, 'random_init')
    scratch = dict(vars(args), random_init=True, output_dir=out)
    baseline = fine_tune(argparse.Namespace(**scratch), run)
    run.say(f'demo fine-tuned top-1: {tuned["top1"]:.1f}% '
            f'(random init, same budget: {baseline["top1"]:.1f}%)')
    return {'pretrained': tuned, 'random_init': baseline}


# ----------------------------------------------------------------------------- main
def main(args):
    """torchrun's processes (or one plain process), one fine-tuning or the
    demo's two, then the end of the process group. One group serves both
    runs of the demo: re-created under torchrun, a group at times failed
    to connect."""
    run = launch.setup()
    if args.preset == 'demo':
        results = demo(args, run)
    else:
        results = fine_tune(args, run)
    launch.teardown()
    return results


if __name__ == '__main__':
    launch.exit_on_user_error(lambda: main(parse_args()))

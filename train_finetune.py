"""End-to-end fine-tuning of a MoCo v3 backbone (Chen, Xie, He, ICCV 2021: Sec. 5, Table 4; transfer
as the official transfer/README.md) with DeiT's recipe, as the paper; its defaults are the flags'.

    python train_finetune.py         # the demo: the demo checkpoint, then random init; CPU ok
    torchrun --nproc_per_node=8 train_finetune.py --pretrained vit-b.pth.tar --epochs 150 /imagenet
    torchrun --nproc_per_node=8 train_finetune.py --preset cifar10 --pretrained vit-b.pth.tar /cifar

Reads top to bottom: arguments -> distributed setup -> data -> model -> optimizer -> resume -> loop.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import augment
import data
import evaluation
import moco
import vit

# ----------------------------------------------------------------------------- arguments
DEMO_CHECKPOINT = 'output/pretrain/checkpoint_last.pth'
# The demo: 5 epochs on 5000 32-px images, ~100 s a run on 2 CPU cores. DeiT's MixUp/CutMix,
# erasing, small crops, RandAugment 9, repeated augmentation (for 100+ ImageNet epochs): softened.
DEMO_PRESET = dict(data=data.DEMO_ROOT, pretrained=DEMO_CHECKPOINT, epochs=5, batch_size=64,
                   lr=8e-3, warmup_epochs=0.25, workers=1, crop_min=0.35, ra_magnitude=5,
                   mixup=0.0, cutmix=0.0, reprob=0.0, repeated_aug=False)
# The official transfer recipes: DeiT's main.py, the flags of transfer/README.md, 8 GPUs x 128. Its
# transfer/datasets.py makes the views: RandomResizedCrop (0.05-1, bilinear) + flip; resize 256/224
# and centre crop to test. No RandAugment, no erasing (the Flowers --reprob 0.25 had no effect).
TRANSFER = dict(batch_size=1024, lr=3e-4, weight_decay=0.1, epochs=100, warmup_epochs=3, reprob=0.0,
                repeated_aug=False, crop_min=0.05, ra_num_ops=0, interpolation='bilinear')
PRESETS = {
    'demo': DEMO_PRESET,
    'cifar10': dict(TRANSFER, dataset='cifar10', drop_path=0.1, mixup=0.8, cutmix=1.0),
    'cifar100': dict(TRANSFER, dataset='cifar100', drop_path=0.1, mixup=0.5, cutmix=1.0),
    'flowers102': dict(TRANSFER, dataset='flowers102', weight_decay=0.3, drop_path=0.1, mixup=0.0,
                       cutmix=0.0),
    'pets': dict(TRANSFER, dataset='pets', drop_path=0.0, mixup=0.8, cutmix=0.0),
}


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 end-to-end fine-tuning (DeiT recipe)', allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help="the image set's root; omit it only for the demo (or --preset demo)")
    p.add_argument('--preset', choices=PRESETS,
                   help='demo: minutes on a CPU; others: official transfer recipes; flags win')
    p.add_argument('--dataset', default='folder', choices=data.DATASETS,
                   help="folder: DATA/{train,val}/<class>/<image>; others: torchvision's layout")
    g = p.add_argument_group('model')
    g.add_argument('-a', '--arch', '--model', help="None: the checkpoint's, else vit_base")
    g.add_argument('--pretrained', '--finetune',
                   help='MoCo checkpoint (ours, official) or backbone weights; none: random init')
    g.add_argument('--random-init', action='store_true',
                   help='build the architecture of --pretrained, keep random weights: the baseline')
    g.add_argument('--img-size', '--input-size', type=int,
                   help="crop size, resized x 256/224 to test; None: checkpoint's, else 224")
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth (ViT-L: 0.5)')
    g = p.add_argument_group('optimisation (defaults: DeiT, as the paper)')
    g.add_argument('--epochs', type=int, default=150, help='paper: 150 ViT-B, 100 ViT-L')
    g.add_argument('-b', '--batch-size', type=int, default=1024, help='GLOBAL batch')
    g.add_argument('--lr', type=float, default=5e-4, help='base lr; the actual is lr x batch / 512')
    g.add_argument('--min-lr', type=float, default=1e-5, help='lr at the end of the cosine')
    g.add_argument('--warmup-epochs', type=float, default=5, help='linear warmup from 0')
    g.add_argument('--wd', '--weight-decay', type=float, default=0.05, dest='weight_decay')
    g.add_argument('--opt-eps', type=float, default=1e-8, help='AdamW epsilon')
    g.add_argument('--layer-decay', type=float,
                   help='ViT layer-wise lr decay (BEiT, MAE; e.g. 0.75): decay^(depth-i), block i')
    g.add_argument('--clip-grad', type=float, help='clip the global gradient norm to this')
    g.add_argument('--model-ema', action='store_true', help='keep and test an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g = p.add_argument_group('regularisation (defaults: DeiT)')
    g.add_argument('--crop-min', type=float, default=0.08, help='smallest RandomResizedCrop area')
    g.add_argument('--interpolation', default='bicubic', choices=('bicubic', 'bilinear'),
                   help='crops, RandAugment, test resize: DeiT bicubic, transfer bilinear')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.8, help='MixUp alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='CutMix alpha (0: off); one a batch')
    g.add_argument('--ra-num-ops', type=int, default=2, help='RandAugment ops per image (0: off)')
    g.add_argument('--ra-magnitude', type=float, default=9, help="RandAugment on timm's 0-10 scale")
    g.add_argument('--ra-mstd', type=float, default=0.5, help='std of the magnitude noise')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True,
                   help="DeiT's: 3 augmentations of each image drawn, on different processes")
    g = p.add_argument_group('run')
    g.add_argument('-e', '--evaluate', '--eval', action='store_true', help='test --resume only')
    g.add_argument('--resume', default='', help="a checkpoint of this script; 'auto': the last one")
    g.add_argument('--output-dir', '--output_dir', default='output/finetune')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', '--num_workers', type=int, default=8, help='per process')
    g.add_argument('--dtype', default='bf16', choices=['bf16', 'fp16', 'fp32'],
                   help='CUDA autocast dtype (fp16 adds a GradScaler); a CPU runs fp32')
    g.add_argument('-p', '--print-freq', type=int, default=20, help='log every N steps')
    return p


def parse_args(argv=None):
    """get_args_parser() with the --preset (no arguments: demo) as defaults, set before the final
    parse: `--preset cifar10 --help` shows what will run, and a flag the user gives always wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('--preset')
    preset = pre.parse_known_args(argv)[0].preset or ('demo' if not argv else None)
    parser = get_args_parser()
    parser.set_defaults(**PRESETS.get(preset, {}), preset=preset)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- distributed setup
def init_distributed():
    """torchrun's env:// when RANK is set (NCCL on GPUs, gloo on CPUs), else one plain process.
    -> (rank, world_size, local_rank, device)"""
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, local_rank, device


# ----------------------------------------------------------------------------- the recipe's pieces
def soft_target_loss(logits, target, smoothing):
    """DeiT's loss. Its timm Mixup smooths the one-hot labels (1 - eps + eps/C on the class, eps/C
    elsewhere), then mixes; SoftTargetCrossEntropy: sum_c -t_c log softmax(z)_c. Mixing is linear,
    the uniform part the same for both images: smoothing after mixing is the same, t = (1 - eps)
    mix(y) + eps / C, F.cross_entropy's label_smoothing. Class indices: DeiT's plain smoothing."""
    return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=smoothing)


def vit_layer_id(name, depth):
    """Layer id for layer-wise lr decay (BEiT, MAE): embeddings 0, block i i+1, others depth+1."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed.'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups of plain parameters (their names in 'names', for people). No weight decay for
    biases, norm weights (ndim <= 1) and model.no_weight_decay() (position embedding, class token),
    as DeiT. layer_decay (ViT): 'lr_scale' layer_decay ** (depth + 1 - layer id), the head's 1."""
    if layer_decay is not None and not isinstance(model, vit.VisionTransformer):
        raise ValueError(f'--layer-decay is defined for ViTs only, not {type(model).__name__}')
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    depth = len(model.blocks) if layer_decay is not None else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer = vit_layer_id(name, depth) if layer_decay is not None else 0
        group = groups.setdefault((layer, no_decay), dict(
            params=[], names=[], weight_decay=0.0 if no_decay else weight_decay,
            lr_scale=layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0))
        group['params'].append(p)
        group['names'].append(name)
    return list(groups.values())


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warmup from 0, then a half-cosine from lr to min_lr; a pure function of the step."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


# ----------------------------------------------------------------------------- data and model
def data_loaders(args, rank, world_size, pin_memory):
    """-> (train set, val set, train loader, val loader) of this process. Val: every world_size-th
    image, each once (evaluation.evaluate all-reduces the sums)."""
    bicubic, batch = args.interpolation == 'bicubic', args.batch_size // world_size
    train_tf = augment.finetune_transform(args.img_size, args.crop_min, args.ra_num_ops,
                                          args.ra_magnitude, args.ra_mstd, args.reprob, bicubic)
    train_set = data.build_dataset(args.dataset, args.data, 'train', train_tf)
    val_tf = augment.eval_transform(args.img_size, bicubic)
    val_set = data.build_dataset(args.dataset, args.data, 'val', val_tf)
    data.check_same_classes(train_set, val_set, args.data)
    if args.repeated_aug:
        sampler = data.RepeatedAugSampler(train_set, world_size, rank, args.seed)
    else:
        sampler = DistributedSampler(train_set, world_size, rank, seed=args.seed, drop_last=True)
    if len(sampler) < batch:                                # repeated augmentation: whole 256s only
        raise ValueError(f'{len(train_set)} training images give each process {len(sampler)} an '
                         f'epoch, fewer than its batch of {batch} (see --no-repeated-aug)')
    loader = DataLoader(train_set, batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=pin_memory, drop_last=True)
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world_size)), batch,
                            num_workers=args.workers, pin_memory=pin_memory)
    return train_set, val_set, loader, val_loader


def read_checkpoints(args):
    """-> (the --resume checkpoint of this script or None, (arch, backbone_kwargs) that --pretrained
    records: (None, {}) for bare weights or none). --resume auto: the output dir's last, if any."""
    if args.resume == 'auto':
        last = os.path.join(args.output_dir, 'checkpoint_last.pth')
        args.resume = last if os.path.isfile(last) else ''
    resume = moco.read_checkpoint(args.resume) if args.resume else None
    if resume is not None and 'best_top1' not in resume:
        raise ValueError(f'--resume {args.resume} is no checkpoint of train_finetune.py (a '
                         'pretraining checkpoint goes to --pretrained)')
    pre = moco.read_checkpoint(args.pretrained) if args.pretrained and not resume else {}
    return resume, (pre.get('arch'), dict(pre.get('backbone_kwargs') or {}))


def build_model(args, num_classes, saved=None):
    """The classifier -> (model, arch, backbone_kwargs); saved: read_checkpoints(args)[1]. A
    ViT is rebuilt at --img-size with drop path, a trainable patch projection and a LEARNED position
    embedding from the checkpoint's (vit.py adapts it to the grid): DeiT's ViT trains its pos_embed.
    Its head: trunc-normal std 0.02, zero bias, as DeiT's (timm 0.3.2); a ResNet's: PyTorch's."""
    saved_arch, kwargs = saved or read_checkpoints(args)[1]
    if args.arch and saved_arch and args.arch != saved_arch:
        raise ValueError(f'--arch {args.arch}, but {args.pretrained} holds a {saved_arch}')
    arch = args.arch or saved_arch or 'vit_base'
    if arch not in moco.ARCHS:
        raise ValueError(f'unknown arch {arch!r}; choose one of: {", ".join(moco.ARCHS)}')
    training_only = ('num_classes', 'zero_init_residual', 'stop_grad_conv1', 'drop_path_rate')
    kwargs = {k: v for k, v in kwargs.items() if k not in training_only}
    if arch in vit.ARCHS:
        kwargs.update(img_size=args.img_size or kwargs.get('img_size') or 224,
                      drop_path_rate=args.drop_path,
                      pos_embed='none' if kwargs.get('pos_embed') == 'none' else 'learned')
    model = moco.build_backbone(arch, num_classes=num_classes, **kwargs)
    if arch in vit.ARCHS:                                   # its bias: 0 already (vit.py)
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02)
    if args.pretrained and not args.random_init:
        src = moco.load_backbone(args.pretrained, arch)     # as pretrained, classifier = identity
        state = src.state_dict()
        if kwargs.get('pos_embed') == 'learned':            # (1, 1 + L, D) for this grid
            state['pos_embed'] = src.pos_embed_for(model.grid, model.grid).detach()
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = 'head' if arch in vit.ARCHS else 'fc'        # load_backbone checked all the others
        assert set(missing) == {f'{head}.weight', f'{head}.bias'} and not unexpected, missing
    return model, arch, {**kwargs, 'num_classes': num_classes}


def restore(ckpt, optimizer, scaler, ema, args):
    """Load the EMA, optimizer, scaler state of a checkpoint -> (epochs done, best top-1 so far)."""
    if ema is not None and ckpt.get('ema') is not None:
        ema.load_state_dict(ckpt['ema'])
    if ckpt.get('optimizer') is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
    elif not args.evaluate:
        raise ValueError(f'{args.resume} holds no optimizer state: resume from checkpoint_last.pth')
    return ckpt['epoch'], ckpt['best_top1']


def validate(model, ema, val_loader, args):
    """Top-1, top-5 (%) and the loss on the val images; the EMA's as ema_*."""
    stats = evaluation.evaluate(model, val_loader, args.device, args.amp_dtype)
    if ema is not None:
        ema_stats = evaluation.evaluate(ema.module, val_loader, args.device, args.amp_dtype)
        stats.update({f'ema_{k}': v for k, v in ema_stats.items()})
    return stats


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(model, optimizer, scaler, ema, loader, epoch, args):
    """One pass over this process's share -> the mean loss over all processes. Every step sets the
    lr from the global step (times each group's lr_scale); every print_freq steps, a line of log."""
    raw_model, steps = getattr(model, 'module', model), len(loader)
    model.train()
    loss_sum = torch.zeros((), device=args.device)          # summed on the device: no sync per step
    desc = f'epoch {epoch + 1}/{args.epochs}'
    bar = tqdm(loader, desc, disable=not args.show_bar, leave=False)
    for i, (images, target) in enumerate(bar):
        step = epoch * steps + i
        lr = lr_at(step, args.epochs * steps, round(args.warmup_epochs * steps), args.actual_lr,
                   args.min_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        images = images.to(args.device, non_blocking=True)  # (B, 3, H, W)
        target = target.to(args.device, non_blocking=True)  # (B,)
        if args.mixer is not None:
            images, target = args.mixer(images, target)     # target (B, C), rows sum to 1
        with torch.autocast(args.device.type, args.amp_dtype, enabled=args.amp_dtype is not None):
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
        if (step + 1) % args.print_freq == 0 and args.rank == 0:   # the only host syncs
            row = dict(epoch=epoch + 1, step=step + 1, loss=loss.item(), lr=lr)
            with open(args.log_path, 'a') as f:
                print(json.dumps(row), file=f)
            bar.set_postfix(loss=f'{row["loss"]:.4f}', lr=f'{lr:.3g}')
            if not args.show_bar:                           # a log file: plain lines, no bar frames
                print(f'{desc} step {i + 1}/{steps}: loss {row["loss"]:.4f}, lr {lr:.3g}')
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (steps * args.world_size)


# ----------------------------------------------------------------------------- main
def main(args):
    if args.preset == 'demo':
        return demo(args)
    rank, world_size, local_rank, device = init_distributed()
    cuda = device.type == 'cuda'
    args.rank, args.world_size, args.device = rank, world_size, device
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.dtype)
    args.amp_dtype = amp_dtype if cuda else None            # bf16 on a CPU is ~400x slower
    args.show_bar = rank == 0 and sys.stdout.isatty() and sys.stderr.isatty()
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.data is None:
        raise ValueError("DATA is required: the image set's root (see --dataset); for the built-in "
                         'demo run `python train_finetune.py` alone, or add --preset demo')
    if args.batch_size % world_size:
        raise ValueError(f'batch size {args.batch_size} is not divisible by {world_size} processes')
    resume, saved = read_checkpoints(args)
    kwargs = resume['backbone_kwargs'] if resume else saved[1] if saved else {}
    args.img_size = args.img_size or kwargs.get('img_size') or 224

    # ------------------------------------------------------------------------- data
    train_set, val_set, loader, val_loader = data_loaders(args, rank, world_size, cuda)
    num_classes = len(train_set.classes)

    # ------------------------------------------------------------------------- model
    torch.manual_seed(args.seed)                            # the same fresh head in every process
    if resume is not None:                                  # this script's: the classifier
        arch, kwargs = resume['arch'], resume['backbone_kwargs']
        model = moco.build_backbone(arch, **kwargs)
        model.load_state_dict(resume['state_dict'])
    else:
        model, arch, kwargs = build_model(args, num_classes, saved)
    if kwargs['num_classes'] != num_classes:
        raise ValueError(f'the checkpoint has {kwargs["num_classes"]} classes, DATA {num_classes}')
    raw_model = model = model.to(device)                    # the bare module: saved
    ema = None
    if args.model_ema:                                      # weights and buffers (BN statistics)
        ema_fn = get_ema_multi_avg_fn(args.model_ema_decay)
        ema = AveragedModel(raw_model, multi_avg_fn=ema_fn, use_buffers=True)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, [local_rank] if cuda else None)

    # ------------------------------------------------------------------------- optimizer
    args.actual_lr = args.lr * args.batch_size / 512        # DeiT's linear scaling rule
    groups = param_groups(raw_model, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.actual_lr, eps=args.opt_eps)
    scaler = torch.amp.GradScaler('cuda', enabled=args.amp_dtype == torch.float16)   # fp16 only
    args.mixer = augment.batch_mixer(args.mixup, args.cutmix, num_classes)   # None: both off

    # ------------------------------------------------------------------------- resume
    start_epoch, best_top1, stats = 0, 0.0, {}
    if resume is not None:
        start_epoch, best_top1 = restore(resume, optimizer, scaler, ema, args)
    end_epoch = start_epoch if args.evaluate else args.epochs   # -e: test only
    source = 'random init' if not args.pretrained or args.random_init else args.pretrained
    say(f'{arch} {kwargs} <- {source}; {args.dataset} {args.data}: {num_classes} classes, '
        f'{len(train_set)} / {len(val_set)} train / val images at {args.img_size} px; global batch '
        f'{args.batch_size} = {world_size} x {args.batch_size // world_size}; base lr {args.lr:g}, '
        f'actual {args.actual_lr:g} (x {args.batch_size}/512); {args.epochs} x {len(loader)} steps')
    args.log_path = os.path.join(args.output_dir, 'log.jsonl')
    plain = {k: v for k, v in vars(args).items() if v is None or isinstance(v, (int, float, str))}
    if rank == 0 and not args.evaluate:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump({**plain, 'arch': arch, 'backbone_kwargs': kwargs}, f, indent=1)

    # ------------------------------------------------------------------------- loop
    for epoch in range(start_epoch, end_epoch):
        # The data order and every random draw (augmentations, MixUp/CutMix, drop path) depend on
        # (seed, epoch, rank) alone: a resumed run replays what an uninterrupted one would see.
        loader.sampler.set_epoch(epoch)
        torch.manual_seed((args.seed * 10 ** 4 + epoch) * 10 ** 4 + rank)
        train_loss = train_one_epoch(model, optimizer, scaler, ema, loader, epoch, args)
        if not math.isfinite(train_loss):                   # before any save: the last one is good
            raise ValueError(f'the loss is {train_loss} in epoch {epoch + 1}; stopped, the last '
                             f'good checkpoint is in {args.output_dir}')
        stats = validate(raw_model, ema, val_loader, args)
        best_top1 = max(best_top1, stats['top1'])
        row = dict(epoch=epoch + 1, step=(epoch + 1) * len(loader), train_loss=train_loss,
                   **{f'val_{k}': v for k, v in stats.items()}, best_top1=best_top1)
        say(json.dumps(row))
        # --------------------------------------------------------------------- save
        if rank == 0:
            with open(args.log_path, 'a') as f:
                print(json.dumps(row), file=f)
            # the bare classifier, not DDP's wrapper: timm's ViT / torchvision's ResNet keys
            ckpt = dict(state_dict=raw_model.state_dict(), arch=arch, backbone_kwargs=kwargs,
                        epoch=epoch + 1, step=row['step'], top1=stats['top1'], best_top1=best_top1,
                        classes=list(train_set.classes), args=plain,
                        optimizer=optimizer.state_dict(),
                        scaler=scaler.state_dict() if scaler.is_enabled() else None,
                        ema=ema.state_dict() if ema is not None else None)
            moco.save_checkpoint(ckpt, os.path.join(args.output_dir, 'checkpoint_last.pth'))
            if stats['top1'] >= best_top1:
                best = {k: v for k, v in ckpt.items() if k not in ('optimizer', 'scaler')}
                moco.save_checkpoint(best, os.path.join(args.output_dir, 'model_best.pth'))
    stats = stats or validate(raw_model, ema, val_loader, args)   # -e, or a finished run resumed
    say(f'top-1 {stats["top1"]:.2f} (best {best_top1:.2f}), top-5 {stats["top5"]:.2f}')
    if world_size > 1:
        dist.destroy_process_group()
    return {**stats, 'best_top1': best_top1}


# ----------------------------------------------------------------------------- the demo
def demo(args):
    """--preset demo (the default without arguments): fine-tune the pretraining demo's checkpoint on
    the built-in set, then the same architecture from random init, same budget; print both."""
    if args.pretrained == DEMO_CHECKPOINT and not os.path.isfile(DEMO_CHECKPOINT):
        raise ValueError(f'no demo checkpoint at {DEMO_CHECKPOINT}: run `python train_pretrain.py` '
                         'first')
    if args.data == data.DEMO_ROOT:
        data.build_demo_dataset(args.data)                  # safe when processes race
    say = print if int(os.environ.get('RANK', 0)) == 0 else (lambda *a, **k: None)
    say(f'demo: fine-tune {args.pretrained} on {args.data}, then the same from random init')
    tuned = main(argparse.Namespace(**{**vars(args), 'preset': None}))
    out = os.path.join(args.output_dir, 'random_init')
    scratch = main(argparse.Namespace(**{**vars(args), 'preset': None, 'random_init': True,
                                         'output_dir': out}))
    say(f'demo fine-tuned top-1: {tuned["top1"]:.1f}% (random init, same budget: '
        f'{scratch["top1"]:.1f}%)')
    return {'pretrained': tuned, 'random_init': scratch}


if __name__ == '__main__':
    try:
        main(parse_args())
    except ValueError as e:  # a user error: one line, no traceback, once (see data.error_line)
        if line := data.error_line(e):                      # None: another rank says it
            print(line, file=sys.stderr)
        sys.exit(1)

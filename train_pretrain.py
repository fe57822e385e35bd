"""MoCo v3 self-supervised pretraining (Chen, Xie, He, ICCV 2021: Sec. 3, Alg. 1, Sec. 4 recipes).

    python train_pretrain.py                                 # the demo: a small ViT, CPU, minutes
    torchrun --nproc_per_node=8 train_pretrain.py --arch vit_base /data/imagenet   # the paper's
    python train_pretrain.py --preset demo --framework byol  # a study of the paper, in miniature

Reads top to bottom: arguments -> distributed setup -> data -> model -> optimizer -> resume -> loop.
Flags are those of the official main_moco.py: its published commands run unchanged under torchrun.
"""
import argparse
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import augment
import data
import evaluation
import moco
import simclr_byol
from lars_lamb import LAMB, LARS

# ----------------------------------------------------------------------------- arguments
# The paper's recipes (official CONFIG.md), chosen by --arch; a --preset on top; given flags win
RECIPES = {
    'vit': dict(optimizer='adamw', lr=1.5e-4, weight_decay=0.1, moco_m=0.99, moco_t=0.2,
                warmup_epochs=40, crop_min=0.08, stop_grad_conv1=True, batch_size=4096, epochs=300),
    'resnet': dict(optimizer='lars', lr=0.6, weight_decay=1e-6, moco_m=0.99, moco_t=1.0, epochs=100,
                   warmup_epochs=10, crop_min=0.2, stop_grad_conv1=False, batch_size=4096),
}
# The frameworks the paper compares: SimCLR has no predictor; BYOL's heads have BN in their hidden
# layers only (BYOL; MoCo v3's appendix); ViTs take the lr and wd of the paper's Sec. 4.2, Fig. 6.
FRAMEWORKS = {'mocov3': {}, 'simclr': dict(predictor=False), 'byol': dict(head_bn='hidden')}
FRAMEWORKS_VIT = {'simclr': dict(lr=2e-4, weight_decay=0.1),
                  'byol': dict(lr=1e-4, weight_decay=0.03)}
PRESETS = {
    # 2 CPU cores, < 10 minutes, the 32-px built-in images; m 0.9: a few hundred steps, the keys
    # must follow; no large-batch spikes to cure; crops of >= 30%: both views still show the shape
    'demo': dict(data=data.DEMO_ROOT, arch='vit_tiny', depth=4,
                 embed_dim=128, num_heads=4, img_size=32, patch_size=4, epochs=8, batch_size=128,
                 lr=2e-3, warmup_epochs=1, moco_mlp_dim=1024, moco_m=0.9, stop_grad_conv1=False,
                 crop_min=0.3, workers=1),
}
VIT_SHAPE = ('depth', 'embed_dim', 'num_heads')
PRESET_ARCH_ONLY = (*VIT_SHAPE, 'lr')        # with another --arch: its shape, its recipe's lr


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 pretraining', allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DATA', help='ImageNet layout, DATA/train/<class>/'
                   '<image>; omitted only by the demo (no arguments, or --preset demo)')
    p.add_argument('--preset', choices=PRESETS, help='demo: a small ViT on the built-in data')
    p.add_argument('-a', '--arch', default='resnet50', choices=moco.ARCHS, metavar='ARCH',
                   help=f'backbone; its recipe sets the defaults: {", ".join(moco.ARCHS)}')
    p.add_argument('--framework', default='mocov3', choices=FRAMEWORKS,
                   help='the paper compares MoCo v3 with SimCLR and BYOL on the same ViTs (Sec. 6)')
    g = p.add_argument_group('backbone (ViT: the ablations of Sec. 6, ViT-B figures)')
    g.add_argument('--img-size', type=int, default=224, help='training crop size in pixels')
    g.add_argument('--patch-size', type=int, help="ViT patch size (default: the arch's, 16)")
    for flag in VIT_SHAPE:
        g.add_argument('--' + flag.replace('_', '-'), type=int, help="default: the arch's")
    g.add_argument('--stop-grad-conv1', action=argparse.BooleanOptionalAction,
                   help='freeze the random patch projection: the stability trick of Sec. 4.2')
    g.add_argument('--pos-embed', default='sincos', choices=('sincos', 'learned', 'none'),
                   help='ViT position embedding (76.5 / 76.1 / 74.9)')
    g.add_argument('--pool', default='token', choices=('token', 'avg'), help='the class token, or '
                   'the mean of the patch tokens, no class token (76.5 / 76.3 w/o final LayerNorm)')
    g.add_argument('--final-norm', action=argparse.BooleanOptionalAction, default=True,
                   help='the final LayerNorm of the ViT (with --pool avg: 69.7 with it)')
    g.add_argument('--grad-ckpt', action='store_true', help='recompute ViT blocks: less memory')
    g = p.add_argument_group('heads and loss')
    g.add_argument('--moco-dim', type=int, default=256, help='output dim of the MLP heads')
    g.add_argument('--moco-mlp-dim', type=int, default=4096, help='hidden dim of the MLP heads')
    g.add_argument('--moco-m', type=float, help='key-encoder momentum; 0 stays 0 (the ablation)')
    g.add_argument('--moco-m-cos', action=argparse.BooleanOptionalAction, default=True,
                   help='raise the momentum from --moco-m to 1 with a half-cosine (BYOL)')
    g.add_argument('--moco-t', type=float, help='temperature tau; ViT is unstable above ~0.2')
    g.add_argument('--head-bn', default='all', choices=moco.HEAD_BN,
                   help='BN in the MLP heads: all (76.5), hidden layers only, or none (74.4)')
    g.add_argument('--predictor', action=argparse.BooleanOptionalAction, default=True,
                   help='the prediction MLP of the query encoder (without: 75.5)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int)
    g.add_argument('--start-epoch', type=int, default=0, help='first epoch, for manual restarts')
    g.add_argument('-b', '--batch-size', type=int, help='GLOBAL batch, split over the processes')
    g.add_argument('--lr', '--learning-rate', type=float, help='base; the run uses lr x batch/256')
    g.add_argument('--wd', '--weight-decay', type=float, dest='weight_decay')
    g.add_argument('--optimizer', choices=('lars', 'adamw', 'lamb'), help="lars (ResNet), adamw "
                   "(ViT) or lamb: give LAMB its own --lr and --wd (Fig. 3), not AdamW's")
    g.add_argument('--momentum', type=float, default=0.9, help='LARS momentum')
    g.add_argument('--warmup-epochs', type=int, help='linear lr warmup, then a half-cosine')
    g.add_argument('--crop-min', type=float, help='smallest RandomResizedCrop area fraction')
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default='output/pretrain', help='checkpoints, log.jsonl, config')
    g.add_argument('--resume', default='', help="checkpoint to continue, or 'auto': the latest one")
    g.add_argument('--pretrained', default='', help='weights to start from (a fresh schedule)')
    g.add_argument('--save-every', type=int, default=0, help='keep checkpoint_<epoch>.pth every N')
    g.add_argument('--knn-data', help='DIR with labelled train/ and val/: kNN top-1 every epoch')
    g.add_argument('--seed', type=int, default=0)
    cpus = (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))  # per process
    g.add_argument('-j', '--workers', type=int, default=min(8, cpus), help='loaders per process')
    g.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], default='bf16',
                   help='CUDA autocast (fp16 adds a GradScaler); a CPU runs fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('-p', '--print-freq', type=int, default=10, help='log every N steps')
    g = p.add_argument_group('official launch flags: accepted and ignored, torchrun does this')
    for flag in ('--world-size', '--rank', '--dist-url', '--dist-backend', '--gpu'):
        g.add_argument(flag, dest='launch_' + flag[2:].replace('-', '_'))
    g.add_argument('--multiprocessing-distributed', action='store_true', dest='launch_mp')
    return p


def parse_args(argv=None):
    """get_args_parser() with the recipe of --arch and --framework, then the --preset, as defaults,
    set before the final parse: `--arch vit_base --help` shows what will run; a given flag wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags in (['--preset'], ['-a', '--arch'], ['--framework'], ['--knn-data']):
        pre.add_argument(*flags)
    pre.add_argument('--epochs', type=int)
    known, _ = pre.parse_known_args(argv)
    demo = known.preset == 'demo' or not argv                      # no arguments at all: the demo
    preset = dict(PRESETS['demo']) if demo else {}
    arch = known.arch or preset.get('arch', 'resnet50')
    vit = arch.startswith('vit')
    recipe = {**RECIPES['vit' if vit else 'resnet'], **FRAMEWORKS.get(known.framework, {}),
              **(FRAMEWORKS_VIT.get(known.framework, {}) if vit else {})}
    if not vit:                       # CONFIG.md: longer ResNet-50 runs, lower lr, more decay and m
        epochs = known.epochs or preset.get('epochs') or recipe['epochs']
        recipe.update(lr=0.6 if epochs < 300 else 0.3, moco_m=0.996 if epochs >= 1000 else 0.99,
                      weight_decay=1.5e-6 if epochs >= 1000 else 1e-6)
    if preset.get('arch', arch) != arch:
        preset = {k: v for k, v in preset.items() if k not in PRESET_ARCH_ONLY}
    parser = get_args_parser()
    parser.set_defaults(**{**recipe, **preset}, preset='demo' if demo else None)
    args = parser.parse_args(argv)
    if demo and known.knn_data is None:         # the demo's kNN monitor: the labelled DATA itself
        args.knn_data = args.data
    return args


# ----------------------------------------------------------------------------- distributed setup
def init_distributed():
    """torchrun's env:// (NCCL on GPUs, gloo on CPUs) or 1 process -> rank, world, local, device"""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ:
        return 0, 1, 0, torch.device('cuda' if cuda else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    device = torch.device(f'cuda:{local_rank}' if cuda else 'cpu')
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo')
    return dist.get_rank(), dist.get_world_size(), local_rank, device


# ----------------------------------------------------------------------------- schedules
def adjust_learning_rate(e, lr, warmup_epochs, epochs):
    """lr at fractional epoch e: linear warmup (Goyal et al. 2017), then a half-cosine to 0."""
    if e < warmup_epochs:
        return lr * e / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


# ----------------------------------------------------------------------------- model and log
def backbone_kwargs(args):
    """The backbone's constructor arguments, kept in every checkpoint: any script rebuilds it."""
    if not args.arch.startswith('vit'):
        return {}
    kwargs = {k: getattr(args, k) for k in ('patch_size', *VIT_SHAPE)
              if getattr(args, k) is not None}        # a given 0 too
    kwargs.update(img_size=args.img_size, stop_grad_conv1=args.stop_grad_conv1)
    for k, default in dict(pos_embed='sincos', final_norm=True, grad_ckpt=False).items():
        if getattr(args, k) != default:                       # only what differs from vit.py's
            kwargs[k] = getattr(args, k)
    if args.pool == 'avg':                        # the paper's "w/o [CLS]": no token at all
        kwargs.update(class_token=False, pool='avg')
    return kwargs


def start_log(args, plain, start_epoch):
    """config.json; log.jsonl keeps what this run has done (a resume drops the epochs to redo)."""
    with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
        json.dump(dict(plain, backbone_kwargs=backbone_kwargs(args)), f, indent=1)
    rows = open(args.log_path).readlines() if args.resume and os.path.isfile(args.log_path) else []
    with open(args.log_path, 'w') as f:
        f.writelines(r for r in rows if json.loads(r)['epoch'] <= start_epoch)


def append_json(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def end_of_epoch(backbone, knn_loaders, args, epoch, loss=None):
    """The epoch's line: mean loss and the kNN top-1 (%) of the query backbone on --knn-data."""
    acc = (evaluation.knn_top1(backbone, *knn_loaders, len(knn_loaders[0].dataset.classes),
                               args.device, args.amp_dtype) if knn_loaders else None)
    args.say(f'epoch {epoch}/{args.epochs}' + (f': loss {loss:.4f}' if loss is not None else '')
             + (f', kNN top-1 {acc:.1f}%' if acc is not None else ''))
    if args.rank == 0:
        append_json(args.log_path, dict(epoch=epoch, loss_avg=loss, knn_top1=acc))
    return acc


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(model, optimizer, scaler, loader, epoch, args, spikes):
    """One pass over the data -> mean loss. lr and m follow the fractional epoch, as officially;
    every print_freq steps (and the last) a log.jsonl row: loss, lr, m, first/last-layer grads."""
    iters, device = len(loader), args.device
    lr = args.lr * args.batch_size / 256                      # the linear scaling rule
    bar = tqdm(loader, f'epoch {epoch + 1}/{args.epochs}', disable=not args.show_bar, leave=False)
    loss_sum = torch.zeros((), device=device)                 # summed on the device: no sync
    tic, seen = time.time(), 0
    for i, (images, _) in enumerate(bar):
        e = epoch + i / iters                                 # fractional epoch
        step_lr = adjust_learning_rate(e, lr, args.warmup_epochs, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        m = moco.adjust_moco_momentum(e, args.moco_m, args.epochs, args.moco_m_cos)
        x1, x2 = (x.to(device, non_blocking=True, memory_format=args.memory_format) for x in images)
        with torch.autocast(device.type, dtype=args.amp_dtype, enabled=args.amp_dtype is not None):
            loss = model(x1, x2, m)                           # momentum update, then the loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach()                             # nan or inf stays so: checked below
        seen += x1.shape[0] * args.world_size
        if i % args.print_freq and i != iters - 1:
            continue
        # ------------------------------------------------------------------------- log (syncs)
        bad = (~torch.isfinite(loss_sum)).float()
        if dist.is_initialized():                             # every process stops together
            dist.all_reduce(bad)
        if bad.item():                                        # before a save: the last is good
            raise ValueError(f'the loss became nan or inf in epoch {epoch + 1} (by step {i}); '
                             f'stopped, the last good checkpoint is in {args.output_dir}')
        row = dict(epoch=epoch + 1, step=epoch * iters + i, loss=loss.item(), lr=step_lr, m=m,
                   img_s=seen / (time.time() - tic), **spikes.measure())
        if 'spike' in row:                                    # the paper's instability signal
            args.say(f'warning: {row["spike"]} {row[row["spike"]]:.3g} is 10x its running median')
        if args.rank == 0:
            append_json(args.log_path, row)
            line = f'loss {row["loss"]:.4f}, lr {step_lr:.3g}, m {m:.4f}, {row["img_s"]:.0f} img/s'
            bar.set_postfix_str(line)
            if not args.show_bar:                             # a log file: no bar frames
                print(f'epoch {epoch + 1} step {i + 1}/{iters}: {line}', flush=True)
        tic, seen = time.time(), 0
    return loss_sum.item() / iters


# ----------------------------------------------------------------------------- optimizer and resume
def build_optimizer(model, args):
    """As the official code: every parameter goes to the optimizer, weight decay on all of them
    (LARS and LAMB skip biases and norms); the momentum encoder, a frozen projection get no grad."""
    params, lr = model.parameters(), args.lr * args.batch_size / 256     # the linear scaling rule
    if args.optimizer == 'lars':
        return LARS(params, lr, weight_decay=args.weight_decay, momentum=args.momentum)
    if args.optimizer == 'lamb':
        return LAMB(params, lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr, weight_decay=args.weight_decay)


def resume(path, model, optimizer, scaler, args):
    """Weights, optimizer and scaler state of a checkpoint of this script -> (epochs done, kNN at
    init): all an exact resume needs, as data and augmentations depend on (seed, epoch, rank)."""
    ckpt = moco.read_checkpoint(path)
    if 'optimizer' not in ckpt or 'epoch' not in ckpt:
        raise ValueError(f'{path} is not a MoCo v3 training checkpoint (no optimizer state)')
    if (ckpt.get('framework', 'mocov3'), ckpt.get('arch')) != (args.framework, args.arch):
        raise ValueError(f'{path}: not --framework {args.framework} --arch {args.arch}')
    moco.load_weights(model, ckpt['state_dict'], path)
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise ValueError(f'the optimizer state of {path} does not fit ({e})') from None
    if ckpt.get('scaler') and scaler.is_enabled():
        scaler.load_state_dict(ckpt['scaler'])
    return ckpt['epoch'], ckpt.get('knn_init')                # 'epoch' = epochs done, as official


# ----------------------------------------------------------------------------- main
def main(args):
    rank, world_size, local_rank, device = init_distributed()
    cuda = device.type == 'cuda'
    args.dtype = args.dtype if cuda else 'fp32'               # bf16 on CPUs: ~400x slower
    args.amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[args.dtype]
    args.rank, args.world_size, args.device = rank, world_size, device
    args.say = say = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    args.show_bar = rank == 0 and sys.stdout.isatty() and sys.stderr.isatty()
    args.memory_format = torch.channels_last if 'resnet' in args.arch else torch.contiguous_format
    if args.data is None:
        raise ValueError('DATA is required (DATA/train/<class>/<image>); the demo needs none: '
                         '`python train_pretrain.py` alone, or --preset demo')
    if args.batch_size % world_size:
        raise ValueError(f'batch size {args.batch_size} is not divisible by {world_size} processes')
    if any(v for k, v in vars(args).items() if k.startswith('launch_')):
        say('note: the launch flags (--dist-url, --world-size, ...) are ignored: torchrun does it')

    # ------------------------------------------------------------------------- data
    if args.data == data.DEMO_ROOT and rank == 0:            # the built-in set, made once by rank 0
        data.build_demo_dataset(args.data)
    if dist.is_initialized():
        dist.barrier()
    if not os.path.isdir(args.data):
        raise ValueError(f'data folder {args.data} does not exist')
    crops = augment.TwoCrops(*augment.pretrain_transforms(args.img_size, args.crop_min))
    train_set = data.image_folder(os.path.join(args.data, 'train'), crops)
    if len(train_set) < args.batch_size:
        raise ValueError(f'{len(train_set)} images, fewer than a batch of {args.batch_size}')
    batch = args.batch_size // world_size                     # per process
    shard = functools.partial(data.make_loader, rank=rank, world_size=world_size,
                              workers=args.workers, pin_memory=cuda, seed=args.seed)
    loader = shard(train_set, batch, train=True)
    knn_loaders = None
    if args.knn_data:                                         # labelled train/ and val/: kNN
        view, root = augment.eval_transform(args.img_size), args.knn_data
        knn_sets = [data.image_folder(os.path.join(root, s), view) for s in ('train', 'val')]
        data.check_same_classes(*knn_sets, args.knn_data)
        knn_loaders = [shard(s, 256, train=False) for s in knn_sets]

    # ------------------------------------------------------------------------- model
    torch.manual_seed(args.seed)                              # the same initial weights everywhere
    model = simclr_byol.build_model(args.framework, arch=args.arch, dim=args.moco_dim,
                                    mlp_dim=args.moco_mlp_dim, T=args.moco_t, head_bn=args.head_bn,
                                    predictor=args.predictor, **backbone_kwargs(args))
    if dist.is_initialized() and cuda:                        # torchrun: DDP, even for 1 process
        model = moco.convert_sync_batchnorm(model)            # BN statistics over the global batch
    raw_model = model = model.to(device, memory_format=args.memory_format)  # bare module: saved
    if args.pretrained:                                       # weights only: a fresh schedule
        state = moco.read_checkpoint(args.pretrained)['state_dict']
        moco.load_weights(raw_model, state, args.pretrained)
    if args.compile:
        model = torch.compile(model)
    if dist.is_initialized():
        ids = [local_rank] if cuda else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    # ------------------------------------------------------------------------- optimizer and resume
    optimizer = build_optimizer(raw_model, args)
    scaler = torch.amp.GradScaler('cuda', enabled=args.dtype == 'fp16')   # bf16 needs no scaling
    os.makedirs(args.output_dir, exist_ok=True)
    args.log_path = os.path.join(args.output_dir, 'log.jsonl')
    last_path = os.path.join(args.output_dir, 'checkpoint_last.pth')
    if args.resume == 'auto':
        args.resume = last_path if os.path.isfile(last_path) else ''
    start_epoch, knn_init = args.start_epoch, None
    if args.resume:
        start_epoch, knn_init = resume(args.resume, raw_model, optimizer, scaler, args)
    say(f'global batch {args.batch_size} = {world_size} x {batch} per process; base lr {args.lr:g}'
        f', actual lr {args.lr * args.batch_size / 256:g} (= base x {args.batch_size}/256); '
        f'{args.framework} {args.arch} {backbone_kwargs(args)}; {args.optimizer}; {args.dtype} on '
        f'{device}; {len(loader)} steps/epoch; from epoch {start_epoch}')
    plain = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    if rank == 0:
        start_log(args, plain, start_epoch)

    monitor = functools.partial(end_of_epoch, raw_model.base_encoder, knn_loaders, args)
    # ------------------------------------------------------------------------- loop
    knn = knn_init = monitor(0) if start_epoch == 0 else knn_init   # epoch 0: the random init
    spikes = evaluation.SpikeMonitor(raw_model.base_encoder)  # gradients of the first, last layers
    for epoch in range(start_epoch, args.epochs):
        # Data order and augmentations depend on (seed, epoch, rank) alone, so resuming at an epoch
        # replays what an uninterrupted run would have seen: exact resume without any RNG state.
        loader.sampler.set_epoch(epoch)
        torch.manual_seed((args.seed * 10 ** 4 + epoch) * 10 ** 4 + rank)
        loss = train_one_epoch(model, optimizer, scaler, loader, epoch, args, spikes)
        knn = monitor(epoch + 1, loss)
        # ------------------------------------------------------------------------- save
        if rank == 0:
            ckpt = dict(state_dict=raw_model.state_dict(), arch=args.arch, framework=args.framework,
                        backbone_kwargs=backbone_kwargs(args), epoch=epoch + 1,
                        optimizer=optimizer.state_dict(), knn_init=knn_init, args=plain,
                        scaler=scaler.state_dict() if scaler.is_enabled() else None)
            moco.save_checkpoint(ckpt, last_path)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                name = f'checkpoint_{epoch + 1:04d}.pth'
                moco.save_checkpoint(ckpt, os.path.join(args.output_dir, name))
    if args.preset == 'demo' and knn is not None and knn_init is not None:
        say(f'demo kNN top-1: {knn:.1f}% (random init: {knn_init:.1f}%)')
    if dist.is_initialized():
        dist.destroy_process_group()
    return knn


if __name__ == '__main__':
    try:
        main(parse_args())
    except ValueError as e:  # a user error: one line, no traceback, once (see data.error_line)
        if line := data.error_line(e):                      # None: another rank says it
            print(line, file=sys.stderr)
        sys.exit(1)

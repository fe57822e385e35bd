"""MoCo v3 self-supervised pretraining (Chen, Xie, He, ICCV 2021: Sec. 3, Alg. 1; Sec. 4, recipes).

    python train_pretrain.py                                # the demo: a small ViT on a CPU
    torchrun --nproc_per_node=8 train_pretrain.py --arch vit_base /data/imagenet   # the paper's
    python train_pretrain.py --preset demo --framework byol  # BYOL (or SimCLR) in its place

Reads top to bottom: arguments -> distributed setup -> data -> model -> optimizer -> resume ->
loop -> save. The flags are those of the official main_moco.py: its published commands run as
they are under torchrun.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import augment
import checkpoint
import data
import evaluation
import launch
import moco
import recipes
import simclr_byol
from lars_lamb import LAMB, LARS
from launch import UserError

VIT_SHAPE = ('depth', 'embed_dim', 'num_heads')


# ----------------------------------------------------------------------------- arguments
def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 pretraining', allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='ImageNet layout, DATA/train/<class>/<image>; '
                        'omitted only by the demo (no arguments, or --preset demo)')
    p.add_argument('--preset', choices=recipes.PRESETS,
                   help='demo: a small ViT on the built-in images')
    p.add_argument('-a', '--arch', default='resnet50', choices=moco.ARCHS, metavar='ARCH',
                   help=f'backbone, which picks the recipe: {", ".join(moco.ARCHS)}')
    p.add_argument('--framework', default='mocov3', choices=('mocov3', 'simclr', 'byol'),
                   help='the paper compares MoCo v3 with SimCLR and BYOL on the same ViTs')

    g = p.add_argument_group('backbone (ViT: the ablations of Sec. 6, ViT-B figures)')
    g.add_argument('--img-size', type=int, default=224, help='training crop size in pixels')
    g.add_argument('--patch-size', type=int, help="ViT patch size (default: the arch's, 16)")
    for name in VIT_SHAPE:
        g.add_argument('--' + name.replace('_', '-'), type=int, help="default: the arch's")
    g.add_argument('--stop-grad-conv1', action=argparse.BooleanOptionalAction,
                   help='freeze the random patch projection: the stability trick of Sec. 4.2 '
                        '(default: on for ViTs)')
    g.add_argument('--pos-embed', default='sincos', choices=('sincos', 'learned', 'none'),
                   help='ViT position embedding (76.5 / 76.1 / 74.9)')
    g.add_argument('--pool', default='token', choices=('token', 'avg'),
                   help='the class token, or the mean of the patch tokens and no class token '
                        '(76.5 / 76.3 without the final LayerNorm)')
    g.add_argument('--final-norm', action=argparse.BooleanOptionalAction, default=True,
                   help='the final LayerNorm of the ViT (with --pool avg: 69.7 with it)')
    g.add_argument('--grad-ckpt', action='store_true', help='recompute ViT blocks: less memory')

    g = p.add_argument_group('heads and loss')
    g.add_argument('--moco-dim', type=int, default=256, help='output dim of the MLP heads')
    g.add_argument('--moco-mlp-dim', type=int, default=4096, help='hidden dim of the MLP heads')
    g.add_argument('--moco-m', type=float, help='key-encoder momentum; 0 stays 0 (the ablation)')
    g.add_argument('--moco-m-cos', action=argparse.BooleanOptionalAction, default=True,
                   help='raise the momentum from --moco-m to 1 with a half-cosine (BYOL)')
    g.add_argument('--moco-t', type=float, help='temperature tau; ViTs are unstable above ~0.2')
    g.add_argument('--head-bn', choices=moco.HEAD_BN,
                   help='BN in the MLP heads: all (76.5), hidden layers only, or none (74.4)')
    g.add_argument('--predictor', action=argparse.BooleanOptionalAction,
                   help='the prediction MLP of the query encoder (without: 75.5)')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int)
    g.add_argument('--start-epoch', type=int, default=0, help='first epoch, for manual restarts')
    g.add_argument('-b', '--batch-size', type=int, default=4096,
                   help='GLOBAL batch, split over the processes')
    g.add_argument('--lr', '--learning-rate', type=float,
                   help='base lr; the run uses lr x batch/256')
    g.add_argument('--wd', '--weight-decay', type=float, dest='weight_decay')
    g.add_argument('--optimizer', choices=('lars', 'adamw', 'lamb'),
                   help="lars (ResNet), adamw (ViT) or lamb: give LAMB its own --lr and --wd "
                        "(Fig. 3), not AdamW's")
    g.add_argument('--momentum', type=float, default=0.9, help='LARS momentum')
    g.add_argument('--warmup-epochs', type=float, help='linear lr warmup, then a half-cosine')
    g.add_argument('--crop-min', type=float, help='smallest RandomResizedCrop area fraction')

    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default='output/pretrain', help='checkpoints, log, config')
    g.add_argument('--resume', default='', help="checkpoint to continue, or 'auto': the latest")
    g.add_argument('--pretrained', default='', help='weights to start from (a fresh schedule)')
    g.add_argument('--save-every', type=int, default=0, help='keep checkpoint_<epoch>.pth every N')
    g.add_argument('--knn-data', help='DIR with labelled train/ and val/: kNN top-1 of the '
                                      'backbone at init, every --knn-every epochs and at the end')
    g.add_argument('--knn-every', type=int, default=1,
                   help='epochs between kNN passes (a pass embeds train/ and val/ once)')
    g.add_argument('--seed', type=int, default=0,
                   help='seed s: the same initial weights, batch order and augmentations in '
                        'every run with s (paired runs)')
    cpus = (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))  # per process
    g.add_argument('-j', '--workers', type=int, default=min(8, cpus), help='loaders per process')
    g.add_argument('--dtype', choices=launch.DTYPES,
                   help='autocast dtype (fp16 adds a GradScaler); default: bf16 on GPUs and on '
                        'CPUs with native bf16, fp32 on other CPUs')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the encoders and heads (not the momentum update); '
                        'on a CPU the demo gains nothing (BENCHMARKS.md)')
    g.add_argument('-p', '--print-freq', type=int, default=10, help='log every N steps')

    g = p.add_argument_group('official launch flags: accepted and ignored, torchrun does this')
    for flag in ('--world-size', '--rank', '--dist-url', '--dist-backend', '--gpu'):
        g.add_argument(flag, dest='launch_' + flag[2:].replace('-', '_'))
    g.add_argument('--multiprocessing-distributed', action='store_true', dest='launch_mp')
    return p


def parse_args(argv=None):
    """Parse twice: first the flags that choose the recipe, then everything with the recipe as
    defaults. No arguments at all run the demo."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flags in (['--preset'], ['-a', '--arch'], ['--framework']):
        first.add_argument(*flags)
    first.add_argument('--epochs', type=int)
    chosen, _ = first.parse_known_args(argv)
    preset = chosen.preset or ('demo' if not argv else None)
    arch = chosen.arch or recipes.PRESETS.get(preset, {}).get('arch', 'resnet50')
    framework = chosen.framework or 'mocov3'
    parser = get_args_parser()
    known = (framework, 'vit') in recipes.RECIPES and arch in moco.ARCHS
    if known and preset in (None, *recipes.PRESETS):    # else the parse below names the bad value
        parser.set_defaults(**recipes.defaults(framework, arch, chosen.epochs, preset),
                            preset=preset)
    args = parser.parse_args(argv)
    if args.preset == 'demo' and args.knn_data is None:
        args.knn_data = args.data               # the demo's kNN monitor: its labelled images
    return args


# ----------------------------------------------------------------------------- schedules
def adjust_learning_rate(e, lr, warmup_epochs, epochs):
    """lr at fractional epoch e: linear warmup (Goyal et al. 2017), then a half-cosine to 0."""
    if e < warmup_epochs:
        return lr * e / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def backbone_kwargs(args):
    """The backbone's constructor arguments, kept in every checkpoint: any script rebuilds it."""
    if not args.arch.startswith('vit'):
        return dict(zero_init_residual=True)          # as the official ResNet pretraining
    kwargs = dict(img_size=args.img_size, stop_grad_conv1=args.stop_grad_conv1)
    for name in ('patch_size', *VIT_SHAPE):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.pos_embed != 'sincos':
        kwargs['pos_embed'] = args.pos_embed
    if not args.final_norm:
        kwargs['final_norm'] = False
    if args.grad_ckpt:
        kwargs['grad_ckpt'] = True
    if args.pool == 'avg':                            # the paper's "w/o [CLS]": no token at all
        kwargs.update(class_token=False, pool='avg')
    return kwargs


def build_model(args):
    """Step 1, the backbone, with its classifier at the projector's input width (the official
    code builds it so; the heads replace it). Step 2, the framework around it."""
    try:
        backbone = moco.ARCHS[args.arch](num_classes=args.moco_mlp_dim, **backbone_kwargs(args))
    except ValueError as e:                # vit.py's own check of a shape flag (torch only)
        raise UserError(f'--arch {args.arch}: {e}') from None
    heads = dict(dim=args.moco_dim, mlp_dim=args.moco_mlp_dim, head_bn=args.head_bn)
    if args.framework == 'mocov3':
        return moco.MoCo(backbone, T=args.moco_t, predictor=args.predictor, **heads)
    if args.framework == 'byol':
        return simclr_byol.BYOL(backbone, predictor=args.predictor, **heads)
    if args.predictor:
        raise UserError('SimCLR has no predictor: drop --predictor')
    return simclr_byol.SimCLR(backbone, T=args.moco_t, **heads)


# ----------------------------------------------------------------------------- one epoch
def train_one_epoch(model, optimizer, scaler, loader, epoch, args, run, amp, spikes, log):
    """One pass over the data -> the mean loss over all processes. lr and m follow the fractional
    epoch, as officially; every print_freq steps (and the last) a row of log.jsonl."""
    iters = len(loader)
    lr = args.lr * args.batch_size / 256                      # the linear scaling rule
    bar = tqdm(loader, f'epoch {epoch + 1}/{args.epochs}', disable=not run.show_bar, leave=False)
    loss_sum = torch.zeros((), device=run.device)             # summed on the device: no sync
    tic, seen = time.time(), 0
    for i, (images, _) in enumerate(bar):
        e = epoch + i / iters                                 # the fractional epoch
        step_lr = adjust_learning_rate(e, lr, args.warmup_epochs, args.epochs)
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        m = moco.adjust_moco_momentum(e, args.moco_m, args.epochs, args.moco_m_cos)
        x1, x2 = (x.to(run.device, non_blocking=True, memory_format=memory_format(args))
                  for x in images)

        with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
            loss = model(x1, x2, m)                           # momentum update, then the loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)                                # unscales the gradients first
        scaler.update()
        spikes.record()                                       # gradient norms, on the device

        loss_sum += loss.detach()                             # nan or inf stays so: checked below
        seen += x1.shape[0] * run.world_size
        if i % args.print_freq and i != iters - 1:
            continue
        # ------------------------------------------------------------------------- log (syncs)
        bad = (~torch.isfinite(loss_sum)).float()
        if dist.is_initialized():                             # every process stops together
            dist.all_reduce(bad)
        if bad.item():                                        # before a save: the last is good
            raise UserError(f'the loss became nan or inf in epoch {epoch + 1} (by step {i}); '
                            f'stopped, the last good checkpoint is in {args.output_dir}')
        row = dict(epoch=epoch + 1, step=epoch * iters + i, loss=loss.item(), lr=step_lr, m=m,
                   img_s=seen / (time.time() - tic), **spikes.summary())
        if 'spike' in row:                                    # the paper's instability signal
            run.say(f'warning: {row["spike"]} spiked to {row["spike_ratio"]:.1f}x '
                    f'its running median')
        log(row)
        line = f'loss {row["loss"]:.4f}, lr {step_lr:.3g}, m {m:.4f}, {row["img_s"]:.0f} img/s'
        bar.set_postfix_str(line)
        if not run.show_bar:                                  # a log file: no bar frames
            run.say(f'epoch {epoch + 1} step {i + 1}/{iters}: {line}')
        tic, seen = time.time(), 0

    if dist.is_initialized():                                 # the mean over all processes
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (iters * run.world_size)


def memory_format(args):
    """NHWC for ResNets: faster convolutions on GPUs and CPUs alike."""
    return torch.channels_last if args.arch.startswith('resnet') else torch.contiguous_format


# ----------------------------------------------------------------------------- optimizer
def build_optimizer(model, args):
    """As the official code: every parameter goes to the optimizer, weight decay on all of them
    (LARS and LAMB skip biases and norms); the momentum encoder and a frozen projection get no
    gradient, so no update."""
    params, lr = model.parameters(), args.lr * args.batch_size / 256
    if args.optimizer == 'lars':
        return LARS(params, lr, weight_decay=args.weight_decay, momentum=args.momentum)
    if args.optimizer == 'lamb':
        return LAMB(params, lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr, weight_decay=args.weight_decay)


def append_json(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


# ----------------------------------------------------------------------------- main
def main(args):
    run = launch.setup()
    amp = launch.amp_dtype(args.dtype, run.device)
    cuda = run.device.type == 'cuda'
    if args.data is None:
        raise UserError('DATA is required (DATA/train/<class>/<image>); the demo needs none: '
                        '`python train_pretrain.py` alone, or --preset demo')
    if args.batch_size % run.world_size:
        raise UserError(f'batch size {args.batch_size} is not divisible by '
                        f'{run.world_size} processes')
    if any(value for name, value in vars(args).items() if name.startswith('launch_')):
        run.say('note: the launch flags (--dist-url, --world-size, ...) are ignored: '
                'torchrun does it')

    # ------------------------------------------------------------------------- data
    if args.data == data.DEMO_ROOT and run.is_main:          # the built-in set, made once
        data.build_demo_dataset(args.data)
    launch.barrier()
    if not os.path.isdir(args.data):
        raise UserError(f'data folder {args.data} does not exist')
    crops = augment.TwoCrops(*augment.pretrain_transforms(args.img_size, args.crop_min))
    train_set = data.image_folder(os.path.join(args.data, 'train'), crops)
    if len(train_set) < args.batch_size:
        raise UserError(f'{len(train_set)} images, fewer than a batch of {args.batch_size}')
    batch = args.batch_size // run.world_size                 # per process
    loader = data.make_loader(train_set, batch, run.rank, run.world_size, args.workers,
                              train=True, pin_memory=cuda, seed=args.seed)
    knn_loaders = None
    if args.knn_data:                                         # labelled train/ and val/: kNN
        view = augment.eval_transform(args.img_size)
        knn_sets = [data.image_folder(os.path.join(args.knn_data, split), view)
                    for split in ('train', 'val')]
        data.check_same_classes(*knn_sets, args.knn_data)
        knn_loaders = [data.make_loader(s, 256, run.rank, run.world_size, args.workers,
                                        train=False, pin_memory=cuda, seed=args.seed)
                       for s in knn_sets]

    # ------------------------------------------------------------------------- model
    torch.manual_seed(args.seed)                              # the same initial weights everywhere
    raw_model = build_model(args)                             # the bare module: saved
    if dist.is_initialized() and cuda:                        # torchrun: DDP, even for 1 process
        raw_model = moco.convert_sync_batchnorm(raw_model)    # BN statistics of the global batch
    raw_model = raw_model.to(run.device, memory_format=memory_format(args))
    if args.pretrained:                                       # weights only: a fresh schedule
        state = checkpoint.read(args.pretrained)['state_dict']
        checkpoint.load_weights(raw_model, state, args.pretrained)
    if args.compile:
        # Each encoder and head in place (the state-dict keys stay), the momentum update not: a
        # compiled forward sees m, a float that changes every step, and would recompile each time.
        for part in raw_model.children():
            part.compile()
    model = raw_model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if cuda else None)

    # ------------------------------------------------------------------------- optimizer, resume
    optimizer = build_optimizer(raw_model, args)
    scaler = torch.amp.GradScaler('cuda', enabled=amp == torch.float16)   # bf16 needs none
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, 'log.jsonl')
    last_path = os.path.join(args.output_dir, 'checkpoint_last.pth')
    resume_path = args.resume
    if resume_path == 'auto':
        resume_path = last_path if os.path.isfile(last_path) else ''
    start_epoch, knn_init = args.start_epoch, None
    if resume_path:
        # all an exact resume needs: data and augmentations depend on (seed, epoch, rank)
        ckpt = checkpoint.resume(resume_path, raw_model, optimizer, scaler,
                                 framework=args.framework, arch=args.arch)
        start_epoch, knn_init = ckpt['epoch'], ckpt.get('knn_init')  # 'epoch': epochs done
        run.say(f'resumed from {resume_path} at epoch {start_epoch}')
    run.say(f'global batch {args.batch_size} = {run.world_size} x {batch} per process; '
            f'base lr {args.lr:g}, actual lr {args.lr * args.batch_size / 256:g} '
            f'(= base x {args.batch_size}/256); {args.framework} {args.arch} '
            f'{backbone_kwargs(args)}; {args.optimizer}; {launch.dtype_name(amp)} on '
            f'{run.device}; {len(loader)} steps/epoch; from epoch {start_epoch}')

    if run.is_main:     # config.json; log.jsonl keeps what was done (a resume drops the redone)
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump(dict(vars(args), backbone_kwargs=backbone_kwargs(args),
                           dtype_used=launch.dtype_name(amp)), f, indent=1)
        rows = open(log_path).readlines() if resume_path and os.path.isfile(log_path) else []
        with open(log_path, 'w') as f:
            f.writelines(r for r in rows if json.loads(r)['epoch'] <= start_epoch)

    def log(row):
        if run.is_main:
            append_json(log_path, row)

    def end_of_epoch(epoch, loss=None):
        """The epoch's line: mean loss and the kNN top-1 (%) of the query backbone."""
        acc = None
        due = epoch % args.knn_every == 0 or epoch == args.epochs
        if knn_loaders and due:
            acc = evaluation.knn_top1(raw_model.base_encoder, *knn_loaders,
                                      len(knn_loaders[0].dataset.classes), run.device, amp)
        run.say(f'epoch {epoch}/{args.epochs}'
                + (f': loss {loss:.4f}' if loss is not None else '')
                + (f', kNN top-1 {acc:.1f}%' if acc is not None else ''))
        log(dict(epoch=epoch, loss_avg=loss, knn_top1=acc))
        return acc

    # ------------------------------------------------------------------------- loop
    knn = knn_init = end_of_epoch(0) if start_epoch == 0 else knn_init   # the random init
    # the gradient norms of the first and the last layers, every step (steps counted globally)
    spikes = evaluation.SpikeMonitor(raw_model.base_encoder, first_step=start_epoch * len(loader))
    for epoch in range(start_epoch, args.epochs):
        # Data order and augmentations depend on (seed, epoch, rank) alone, so resuming at an epoch
        # replays what an uninterrupted run would have seen: exact resume without any RNG state.
        loader.sampler.set_epoch(epoch)
        torch.manual_seed((args.seed * 10 ** 4 + epoch) * 10 ** 4 + run.rank)
        loss = train_one_epoch(model, optimizer, scaler, loader, epoch, args, run, amp, spikes,
                               log)
        knn = end_of_epoch(epoch + 1, loss)

        # --------------------------------------------------------------------- save
        if run.is_main:
            ckpt = dict(state_dict=raw_model.state_dict(), arch=args.arch,
                        framework=args.framework, backbone_kwargs=backbone_kwargs(args),
                        epoch=epoch + 1, optimizer=optimizer.state_dict(), knn_init=knn_init,
                        args=vars(args),
                        scaler=scaler.state_dict() if scaler.is_enabled() else None)
            checkpoint.save(ckpt, last_path)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                name = f'checkpoint_{epoch + 1:04d}.pth'
                checkpoint.save(ckpt, os.path.join(args.output_dir, name))

    if args.preset == 'demo' and knn is not None and knn_init is not None:
        run.say(f'demo kNN top-1: {knn:.1f}% (random init: {knn_init:.1f}%)')
    launch.teardown()
    return knn


if __name__ == '__main__':
    launch.exit_on_user_error(lambda: main(parse_args()))

"""Linear probing and kNN evaluation of a frozen MoCo v3 backbone
(Chen, Xie, He, ICCV 2021).

Linear probing is the metric of the paper's tables (73.2 ViT-S,
76.7 ViT-B, 74.6 R-50 in the official CONFIG.md). This file follows
the official main_lincls.py protocol and adds a weighted kNN and a
fast CPU mode.

    python train_linear.py  # the demo: probes output/pretrain/checkpoint_last.pth and random init
    torchrun --nproc_per_node=8 train_linear.py -a vit_base --lr 3
        --pretrained vit-b-300ep.pth.tar /data/imagenet

Reads top to bottom: arguments -> the pieces of a probe -> `probe`
(data -> model -> optimizer -> resume -> loop -> save) -> `main`, which
sets up the processes and runs one probe (the demo: two).
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
from tqdm import tqdm

import augment
import checkpoint
import data
import evaluation
import launch
import moco
import vit
from launch import UserError

DEMO_CHECKPOINT = 'output/pretrain/checkpoint_last.pth'
NOT_PAPER = "cached features: not the paper's protocol"
# The demo: cached features and kNN, the fastest route on a 2-core CPU.
PRESETS = {
    'demo': dict(data=data.DEMO_ROOT, pretrained=DEMO_CHECKPOINT,
                 cache_features=True, knn=True,
                 epochs=100, batch_size=256, workers=1),
}


# ----------------------------------------------------------------------------- arguments
def get_args_parser():
    p = argparse.ArgumentParser(
        'MoCo v3 linear probing and kNN', allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('data', nargs='?', metavar='DATA',
                   help='train/ and val/ in the ImageNet layout (or the root of --dataset); '
                        'omitted only by the demo (no arguments at all, or --preset demo)')
    p.add_argument('--preset', choices=PRESETS,
                   help="demo: probe the pretraining demo's result")
    p.add_argument('--dataset', default='folder', choices=data.DATASETS,
                   help="DATA's layout")

    g = p.add_argument_group('model')
    g.add_argument('-a', '--arch', default='resnet50',
                   choices=moco.ARCHS, metavar='ARCH',
                   help="backbone (default: the checkpoint's)")
    g.add_argument('--pretrained', default='',
                   help='pretraining checkpoint: ours or official')
    g.add_argument('--random-init', action='store_true',
                   help='the architecture of --pretrained with random weights: the baseline')
    g.add_argument('--img-size', type=int, default=224,
                   help="train and eval crop; eval resizes to img-size*256/224 first")

    g = p.add_argument_group('optimisation (the official main_lincls.py)')
    g.add_argument('--epochs', type=int, default=90)
    g.add_argument('--start-epoch', type=int, default=0,
                   help='first epoch (resume sets it)')
    g.add_argument('-b', '--batch-size', type=int, default=1024,
                   help='GLOBAL batch')
    g.add_argument('--lr', '--learning-rate', type=float,
                   help='base lr, x batch/256 (CONFIG.md: ViT 3, ResNet 0.1)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--wd', '--weight-decay', type=float, default=0.0,
                   dest='weight_decay')

    g = p.add_argument_group('kNN and the CPU mode')
    g.add_argument('--knn', action='store_true',
                   help='also weighted kNN on frozen features')
    g.add_argument('--knn-k', type=int, default=20,
                   help='neighbours that vote')
    g.add_argument('--knn-t', type=float, default=0.07,
                   help='T of the exp(sim / T) vote weights')
    g.add_argument('--cache-features', action='store_true',
                   help='embed train/val once without augmentation and train the linear layer '
                        "on those features: minutes instead of hours on a CPU, but NOT the "
                        "paper's protocol")

    g = p.add_argument_group('run')
    g.add_argument('-e', '--evaluate', action='store_true',
                   help='only evaluate (with --resume)')
    g.add_argument('--resume', default='',
                   help="a checkpoint of this script, or 'auto'")
    g.add_argument('--output-dir', default='output/linear')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('-j', '--workers', type=int, default=8)
    # Not the other scripts' hardware default: the protocol is part of the metric.
    g.add_argument('--dtype', default='fp32', choices=launch.DTYPES,
                   help="autocast dtype of the frozen backbone; the official protocol runs "
                        "fp32 (bf16 is faster, but then not the paper's protocol); the head "
                        "always trains in fp32")
    g.add_argument('-p', '--print-freq', type=int, default=10)

    g = p.add_argument_group('official launch flags: accepted and ignored, torchrun sets these')
    for flag in ('--world-size', '--rank', '--dist-url', '--dist-backend', '--gpu'):
        g.add_argument(flag, dest='launch_' + flag[2:].replace('-', '_'))
    g.add_argument('--multiprocessing-distributed', action='store_true',
                   dest='launch_mp')
    return p


def checkpoint_defaults(path):
    """arch and img_size that a checkpoint records (ours both, the
    official ones the arch only)."""
    if not path or not os.path.isfile(path):
        return {}
    ckpt = checkpoint.read(path)
    backbone_kwargs = ckpt.get('backbone_kwargs') or {}
    img_size = backbone_kwargs.get('img_size') or ckpt.get('img_size')
    saved = dict(arch=ckpt.get('arch'), img_size=img_size)
    return {k: v for k, v in saved.items() if v is not None}


def parse_args(argv=None):
    """get_args_parser() with the preset and what the checkpoint records
    (arch, img_size, hence the lr of CONFIG.md) as its defaults, set before
    the final parse: --help shows them, and a flag given wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ('--preset', '--pretrained', '--resume'):
        pre.add_argument(flag)
    pre.add_argument('-a', '--arch')
    known, _ = pre.parse_known_args(argv)

    demo = known.preset == 'demo' or not argv
    preset = PRESETS['demo'] if demo else {}
    resume = known.resume if known.resume != 'auto' else None
    path = resume or known.pretrained or preset.get('pretrained')
    saved = checkpoint_defaults(path)
    arch = known.arch or saved.get('arch', 'resnet50')
    lr = 3.0 if arch.startswith('vit') else 0.1

    parser = get_args_parser()
    parser.set_defaults(**saved, lr=lr, **preset,
                        preset='demo' if demo else None)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- the frozen model
def build_model(path, arch, num_classes, weights=True):
    """The official main_lincls.py model: the backbone of a checkpoint
    (checkpoint.load_backbone: the base encoder, projector dropped, loaded
    strictly; random weights when weights=False or no path is given) with a
    fresh linear classifier (`head` of a ViT, `fc` of a ResNet; weight
    N(0, 0.01), bias 0), everything else frozen -> (model, key)."""
    if path:
        model = checkpoint.load_backbone(path, arch, weights=weights)
    else:
        model = moco.ARCHS[arch](num_classes=0)
    key = 'head' if isinstance(model, vit.VisionTransformer) else 'fc'
    head = nn.Linear(model.num_features, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    setattr(model, key, head)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(key + '.')
    # eval mode for good, also while training the head: BN in train mode
    # would update its running statistics, and linear probing may change
    # nothing of the pretrained model (the official main_lincls.py does the
    # same).
    return model.eval(), key


def sanity_check(model, reference, key):
    """The official sanity check: after probing, every backbone weight and
    buffer (BN statistics included) must be bit-identical to `reference`
    (the checkpoint's backbone); only the classifier `key` may change."""
    for k, v in model.state_dict().items():
        if k.startswith(key + '.'):
            continue
        same = k in reference and torch.equal(v.cpu(), reference[k].cpu())
        if not same:
            raise RuntimeError(f'sanity check failed: {k} changed during linear probing')


# ----------------------------------------------------------------------------- the batches
def backbone_batches(model, loader, device, amp):
    """(features (B, D) fp32, target (B,)) of each batch of images; no
    graph through the frozen backbone, which gives the head the same
    gradients as the official model(images) at a fraction of the cost."""
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, amp, enabled=amp is not None):
            feats = model.forward_features(images)                   # (B, D)
        yield feats.float(), target.to(device, non_blocking=True)


def feature_batches(feats, labels, batch_size, seed=None):
    """Mini-batches of cached features (N, D), shuffled by `seed`
    (None: in order)."""
    n = feats.shape[0]
    if seed is None:
        order = torch.arange(n)
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
    for idx in order.split(batch_size):
        idx = idx.to(feats.device)
        yield feats[idx], labels[idx]


# ----------------------------------------------------------------------------- one epoch
def lr_at(epoch, init_lr, epochs):
    """The official per-epoch half-cosine decay, no warmup."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def train_one_epoch(head, optimizer, batches, steps, lr, run, sharded):
    """One epoch of the classifier at lr on (features, target) batches
    -> mean loss. sharded (no cached features): each process has its own
    shard of the images, and the head's gradients are averaged, as DDP
    would."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    show_bar = run.show_bar and sharded          # cached: milliseconds, no bar
    bar = tqdm(batches, total=steps, leave=False, disable=not show_bar)
    loss_sum = 0.0                               # a device tensor: no sync per step
    for feats, target in bar:                    # (B, D), (B,)
        loss = F.cross_entropy(head(feats), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sharded and run.world_size > 1:       # only two tensors are trained
            for p in head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= run.world_size
        optimizer.step()
        loss_sum = loss_sum + loss.detach()
    return float(loss_sum) / max(steps, 1)


# ----------------------------------------------------------------------------- resume, kNN, save
def read_resume(path, args):
    """The checkpoint of this script at `path`, or None without one.
    Without --pretrained the run probes the backbone that checkpoint
    probed: args take its --pretrained and --random-init (resolved)."""
    if not path:
        return None
    resume = checkpoint.read(path)
    if 'best_acc1' not in resume:
        raise UserError(f'{path} is no checkpoint of train_linear.py (a pretraining '
                        f'checkpoint goes to --pretrained)')
    if not args.pretrained:
        args.pretrained = resume['args']['pretrained']
        args.random_init = resume['args']['random_init']
    return resume


def knn(train_feats, train_labels, val_feats, val_labels, num_classes, args):
    """Weighted kNN top-1 / top-5 (%) of the val features against the
    train features."""
    scores = evaluation.knn_predict(train_feats, train_labels, val_feats,
                                    num_classes, args.knn_k, args.knn_t)
    top1, top5 = evaluation.accuracy(scores, val_labels, (1, 5))
    return dict(knn_top1=top1, knn_top5=top5)


def save_epoch(args, row, model, optimizer, best_acc1, is_best):
    """Rank 0, each epoch: the log row (printed, and in log.jsonl);
    checkpoint_last.pth (with cached features only at the end: 10 MB per
    millisecond epoch would dominate) and model_best.pth."""
    epoch = row['epoch']
    last = epoch == args.epochs - 1
    cached = args.cache_features
    if not cached or last or (epoch + 1) % 10 == 0:       # cached: milliseconds each
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    ckpt = dict(epoch=epoch + 1, arch=args.arch, img_size=args.img_size,
                args=vars(args), state_dict=model.state_dict(),
                optimizer=optimizer.state_dict(), best_acc1=best_acc1)
    if not cached or last:
        checkpoint.save(ckpt, os.path.join(args.output_dir, 'checkpoint_last.pth'))
    if is_best:
        checkpoint.save(ckpt, os.path.join(args.output_dir, 'model_best.pth'))


# ----------------------------------------------------------------------------- one probe
def probe(args, run):
    """One linear probe (and kNN) of a frozen backbone on this process
    group (main's `run`) -> top-1 / top-5 (%) of the val images, best_top1,
    and knn_top1 / knn_top5 with --knn."""
    amp = launch.amp_dtype(args.dtype, run.device)
    cuda = run.device.type == 'cuda'
    if args.data is None:
        raise UserError('DATA is required: a folder with train/ and val/ in the ImageNet '
                        'layout; the demo: `python train_linear.py` alone '
                        '(after train_pretrain.py)')
    if args.batch_size % run.world_size:
        raise UserError(f'batch {args.batch_size} is not divisible by '
                        f'{run.world_size} processes')
    resume_path = args.resume
    if resume_path == 'auto':                             # the output dir's last, if any
        last = os.path.join(args.output_dir, 'checkpoint_last.pth')
        resume_path = last if os.path.isfile(last) else ''
    resume = read_resume(resume_path, args)
    torch.manual_seed(args.seed)

    # ------------------------------------------------------------------------- data
    if args.data == data.DEMO_ROOT and run.is_main:       # the built-in set, made once ...
        data.build_demo_dataset(args.data)
    launch.barrier()                                      # ... before any process reads it
    train_view = augment.linear_transform(args.img_size)
    plain_view = augment.eval_transform(args.img_size)
    train_set = data.build_dataset(args.dataset, args.data, 'train', train_view)
    # the same images without augmentation: kNN and cached features
    train_plain = data.build_dataset(args.dataset, args.data, 'train', plain_view)
    val_set = data.build_dataset(args.dataset, args.data, 'val', plain_view)
    data.check_same_classes(train_set, val_set, args.data)
    num_classes = len(train_set.classes)
    batch = args.batch_size // run.world_size             # per process

    def shard(dataset, train):                            # this process's loader
        return data.make_loader(dataset, batch, run.rank, run.world_size,
                                args.workers, train=train, pin_memory=cuda,
                                seed=args.seed)

    # ------------------------------------------------------------------------- model
    model, key = build_model(args.pretrained, args.arch, num_classes,
                             weights=not args.random_init)
    if resume is not None:
        checkpoint.load_weights(model, resume['state_dict'], resume_path)
    from_file = bool(args.pretrained) and not args.random_init
    snapshot = None                    # the sanity check's reference: the file, re-read ...
    if not from_file:                  # ... or a copy of the random weights
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    head = getattr(model.to(run.device), key)

    # ------------------------------------------------------------------------- optimizer
    init_lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), init_lr,
                                momentum=args.momentum,
                                weight_decay=args.weight_decay)

    # ------------------------------------------------------------------------- resume
    start_epoch, best_acc1 = args.start_epoch, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
        start_epoch = resume['epoch']
        best_acc1 = resume['best_acc1']

    if args.cache_features:
        protocol = NOT_PAPER
    elif amp is None:
        protocol = "the paper's protocol"
    else:
        protocol = f"{args.dtype}: not the paper's protocol"
    source = args.pretrained if from_file else 'random init'
    run.say(f'{args.arch} <- {source}; {num_classes} classes, {len(train_set)} train / '
            f'{len(val_set)} val images at {args.img_size} px')
    run.say(f'global batch {args.batch_size} = {run.world_size} x {batch}; base lr '
            f'{args.lr:g} -> {init_lr:g}; {launch.dtype_name(amp)} on {run.device}; '
            f'{protocol}')
    if run.is_main and not args.evaluate:
        os.makedirs(args.output_dir, exist_ok=True)
        config = dict(vars(args), dtype_used=launch.dtype_name(amp))
        with open(os.path.join(args.output_dir, 'config.json'), 'w') as f:
            json.dump(config, f, indent=1)

    # ------------------------------------------------------------------------- frozen features
    def features(dataset):                     # gathered, in dataset order
        loader = shard(dataset, train=False)
        feats = evaluation.extract_features(model, loader, run.device, amp)
        return [t.to(run.device) for t in feats]

    val_feats, val_labels = features(val_set)
    if args.knn or args.cache_features:
        train_feats, train_labels = features(train_plain)
    results = {}
    if args.knn:
        results = knn(train_feats, train_labels, val_feats, val_labels,
                      num_classes, args)
        run.say(f'kNN (k={args.knn_k}, T={args.knn_t}) top-1 {results["knn_top1"]:.2f}  '
                f'top-5 {results["knn_top5"]:.2f}')

    def validate():            # each rank scores its share of the features; evaluate() sums them
        share = slice(run.rank, None, run.world_size)
        batches = feature_batches(val_feats[share], val_labels[share], 1024)
        return evaluation.evaluate(head, batches, run.device)

    if args.evaluate:
        stats = validate()
        run.say(f'val top-1 {stats["top1"]:.2f}  top-5 {stats["top5"]:.2f}  '
                f'loss {stats["loss"]:.4f}')
        return {**results, 'top1': stats['top1'], 'top5': stats['top5']}

    # ------------------------------------------------------------------------- loop
    train_loader = shard(train_set, train=True)
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        lr = lr_at(epoch, init_lr, args.epochs)
        torch.manual_seed(args.seed + epoch)  # augmentations: by epoch, exact resume
        if args.cache_features:               # every rank trains on all features
            batches = feature_batches(train_feats, train_labels,
                                      args.batch_size, args.seed + epoch)
            steps = math.ceil(len(train_feats) / args.batch_size)
        else:
            train_loader.sampler.set_epoch(epoch)
            batches = backbone_batches(model, train_loader, run.device, amp)
            steps = len(train_loader)
        train_loss = train_one_epoch(head, optimizer, batches, steps, lr, run,
                                     sharded=not args.cache_features)
        stats = validate()
        best_acc1 = max(best_acc1, stats['top1'])

        # --------------------------------------------------------------------- save
        if run.is_main:
            row = dict(epoch=epoch, lr=lr, train_loss=train_loss,
                       val_top1=stats['top1'], val_top5=stats['top5'],
                       val_loss=stats['loss'], best_top1=best_acc1,
                       protocol=protocol)
            is_best = stats['top1'] >= best_acc1
            save_epoch(args, row, model, optimizer, best_acc1, is_best)

    stats = stats or validate()                # resumed a finished run
    if snapshot is None:
        snapshot = checkpoint.load_backbone(args.pretrained, args.arch).state_dict()
    sanity_check(model, snapshot, key)
    reference = 'the checkpoint' if from_file else 'its initial state'
    run.say(f'sanity check passed: the backbone (weights and BN statistics) is '
            f'bit-identical to {reference}')
    results.update(top1=stats['top1'], top5=stats['top5'], best_top1=best_acc1)
    run.say(f'linear probe top-1 {stats["top1"]:.2f} (best {best_acc1:.2f})  '
            f'top-5 {stats["top5"]:.2f}  [{protocol}]')
    return results


# ----------------------------------------------------------------------------- the demo
def demo(args, run):
    """The demo: probe the pretraining demo's checkpoint, then the same
    architecture with random weights under the same budget, and print
    both."""
    if not os.path.isfile(args.pretrained):
        raise UserError(f'no demo checkpoint at {args.pretrained}: '
                        f'run `python train_pretrain.py` first')
    trained = probe(argparse.Namespace(**vars(args)), run)
    out = os.path.join(args.output_dir, 'random_init')
    scratch = dict(vars(args), random_init=True, output_dir=out)
    baseline = probe(argparse.Namespace(**scratch), run)
    run.say(f'demo linear top-1: {trained["top1"]:.1f}% '
            f'(random init: {baseline["top1"]:.1f}%) [{NOT_PAPER}]')
    run.say(f'demo kNN top-1: {trained["knn_top1"]:.1f}% '
            f'(random init: {baseline["knn_top1"]:.1f}%)')
    return {'trained': trained, 'random_init': baseline}


# ----------------------------------------------------------------------------- main
def main(args):
    """torchrun's processes (or one plain process), one probe or the
    demo's two, then the end of the process group. One group serves both
    probes of the demo: re-created under torchrun, a group at times failed
    to connect."""
    run = launch.setup()
    if args.preset == 'demo':
        results = demo(args, run)
    else:
        results = probe(args, run)
    launch.teardown()
    return results


if __name__ == '__main__':
    launch.exit_on_user_error(lambda: main(parse_args()))

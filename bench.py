"""Speed and memory of MoCo v3 pretraining (Chen, Xie, He, ICCV 2021, Alg. 1) on synthetic data.

    python bench.py --arch vit_small -b 8                 # CPU: ViT-S/16, 224 px, batch 8
    python bench.py --arch vit_base -b 128 --dtype bf16   # one GPU (cuda when present)
    python bench.py --arch resnet50 -b 8 --channels-last  # ResNet-50, NHWC convolutions
    python bench.py --data                                # the data pipeline, images/s per worker
    python bench.py ... --compare-optimizers --json       # + AdamW/LARS/LAMB step times; JSON

Training mode: random tensors (no loading), `--warmup` untimed steps, then the median of `--steps`
timed ones of
  * the real step `model(x1, x2, m)` + backward + optimizer step: the headline images/s;
  * the same step cut into phases with MoCo's own pieces (`update_momentum_encoder`, the encoders,
    `predictor`, `contrastive_loss`), synchronised between phases on CUDA: momentum update, query
    forward (base encoder + predictor, both crops), momentum forward (no grad), loss, backward,
    optimizer.
FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over eager training steps
(forward + backward, no recomputation) and set against the device's own matmul peak, measured
here in the same dtype: bf16 where the hardware computes it natively (CUDA; CPUs with AVX512-BF16,
AMX or Arm BF16: autocast on either), else fp32 (on CUDA strict IEEE fp32, TF32 off in the step
and in the peak alike). Peak memory is that of the timed steps alone.
Data mode: the pretraining's two-crop augmentation (augment.py) on generated JPEG/PNG files, one
thread (= one DataLoader worker): the training pipeline (PIL decode, torchvision v2 ops on PIL
images, PIL's blur) against the same with torchvision's kernel blur, and against torchvision.io
decoding with the ops on uint8 tensors.
"""
import argparse
import ast
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import augment
import data
import launch
import moco
import vit
from lars_lamb import LAMB, LARS

PHASES = ('momentum_update', 'query_forward', 'momentum_forward', 'loss', 'backward', 'optimizer')


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 benchmark', description=__doc__.split('\n')[0])
    g = p.add_argument_group('model')
    g.add_argument('--arch', default='vit_small', help='one of: ' + ', '.join(moco.ARCHS))
    g.add_argument('-b', '--batch-size', type=int, default=8, help='images per step (2 crops each)')
    g.add_argument('--img-size', type=int, default=224)
    g.add_argument('--patch-size', type=int, help="ViT patch size (default: the arch's, 16)")
    g.add_argument('--moco-dim', type=int, default=256)
    g.add_argument('--moco-mlp-dim', type=int, default=4096)
    g.add_argument('--kw', action='append', default=[], metavar='KEY=VALUE',
                   help='extra backbone argument, e.g. --kw depth=2 --kw embed_dim=64 '
                        '(tiny configs)')
    g = p.add_argument_group('speed levers')
    g.add_argument('--device', default=None, help='cpu or cuda[:i] (default: cuda when present)')
    g.add_argument('--dtype', choices=launch.DTYPES,
                   help='autocast dtype (default: bf16 on CUDA and on CPUs with native bf16, '
                        'else fp32); fp16 is CUDA only')
    g.add_argument('--optimizer', choices=('adamw', 'lars', 'lamb'), default='adamw',
                   help="train_pretrain.py's: torch's AdamW (foreach), LARS / LAMB of lars_lamb.py")
    g.add_argument('--compile', action='store_true',
                   help='torch.compile both encoders and the predictor, in place (one process, no '
                        'DDP); the first step includes the compilation (compile_s)')
    g.add_argument('--grad-ckpt', action='store_true',
                   help='activation checkpointing of every ViT block')
    g.add_argument('--channels-last', action='store_true', help='NHWC memory format (ResNet convs)')
    g.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    g = p.add_argument_group('measurement')
    g.add_argument('--warmup', type=int, default=2)
    g.add_argument('--steps', type=int, default=5, help='timed steps; the median is reported')
    g.add_argument('--peak-n', type=int, help='matmul size for the peak (4096 CUDA, 2048 CPU)')
    g.add_argument('--compare-optimizers', action='store_true',
                   help='also time AdamW (loop / foreach / fused), LARS and LAMB steps')
    g.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    g = p.add_argument_group('data pipeline mode')
    g.add_argument('--data', action='store_true', help='time decoding + two-crop augmentation')
    g.add_argument('--data-format', choices=('jpeg', 'png'), default='jpeg')
    g.add_argument('--data-images', type=int, default=32, help='generated files, read once a pass')
    g.add_argument('--data-src-size', type=int, nargs=2, default=(500, 375), metavar=('W', 'H'),
                   help='size of the generated files (ImageNet\'s typical 500 x 375)')
    return p


@contextlib.contextmanager
def clock(device, times, cpu_times=None):
    """Appends the with-block's wall-clock seconds (device work included) to `times`, its process
    CPU seconds to a list `cpu_times`: on a shared CPU they count only our time, not the waits."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    yield
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - c)
    times.append(time.perf_counter() - t)


def timed(fn, device, n=1, cpu_times=None):
    """The seconds of each of n calls of fn(), as `clock` measures them."""
    times = []
    for _ in range(n):
        with clock(device, times, cpu_times):
            fn()
    return times


def median_ms(times):
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- FLOPs and peak
def attention_flops(q, k, v, *args, out_shape=None, **kwargs):
    """softmax(q k^T) v from (b, h, s, d) shapes: 2 (backward: 4) batched matmuls of 2 b h s_q s_k d
    FLOPs. Model FLOPs: scores that flash backward kernels recompute are not counted, as MFU
    (Chowdhery et al., PaLM, App. B) counts work the model needs, not work a kernel redoes."""
    b, h, s_q, d = q
    return 2 * b * h * s_q * k[2] * (d + v[3])


# FlopCounterMode knows the CUDA attention kernels but not the CPU one (torch 2.14 counts 0 FLOPs
# for it), and counts a recomputation in the CUDA backward; one formula for every kernel keeps CPU
# and CUDA comparable. A backward kernel's arguments are (grad_out, q, k, v, ...).
ATTENTION_FLOPS = {}
for kernel in ('flash_attention_for_cpu', 'flash_attention', 'efficient_attention',
               'cudnn_attention'):
    name = f'_scaled_dot_product_{kernel}'
    if hasattr(torch.ops.aten, name):  # not every kernel exists in every torch version
        ATTENTION_FLOPS[getattr(torch.ops.aten, name)] = attention_flops
        ATTENTION_FLOPS[getattr(torch.ops.aten, name + '_backward')] = (
            lambda grad_out, *shapes, **kwargs: 2 * attention_flops(*shapes, **kwargs))


def matmul_peak(device, dtype, n, reps=5):
    """Best FLOP/s of an n x n x n matmul in `dtype` over `reps` runs: the roofline bench measures
    against. Returns (by wall clock, by process CPU time / threads)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.mm(a, b)  # warm up the kernel choice and thread pool
    cpu = []
    best = min(timed(lambda: torch.mm(a, b, out=c), device, reps, cpu))
    return 2 * n ** 3 / best, 2 * n ** 3 / (min(cpu) / torch.get_num_threads())


def step_flops(model, make_batch, batch, amp):
    """Model FLOPs of one training step of `batch` images (forward + backward), counted without
    running that batch, so that the count cannot fail or take memory where the benchmarked step
    would not (a --grad-ckpt row would first run an uncheckpointed step). Every counted term
    (matmul, convolution, attention) grows linearly with the batch except the loss's (B, B)
    logits: FLOPs(B) = a B + c B^2, which two small counted steps give exactly. Eager and without
    checkpointing: recomputation is not model FLOPs (MFU, Chowdhery et al., PaLM, App. B)."""
    def counted(b):
        x1, x2 = make_batch(b), make_batch(b)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            with amp():
                loss = model(x1, x2, 0.99)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()
    f2, f4 = counted(2), counted(4)   # BatchNorm needs 2 images
    # the parabola through (0, 0), (2, f2), (4, f4) at B (Lagrange): an exact integer
    B = batch
    return (f4 * B * (B - 2) - 2 * f2 * B * (B - 4)) // 8


# ----------------------------------------------------------------------------- peak memory
def reset_peak_memory(device):
    """Starts the high-water mark of memory here; returns what `peak_memory` will report. On a CPU
    Linux resets the process's peak RSS on writing 5 to /proc/self/clear_refs; elsewhere the
    lifetime peak stays."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return 'cuda max_memory_allocated'
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        return 'process peak RSS since it began (CPU)'
    return 'process peak RSS (CPU)'


def peak_memory(device):
    """Bytes at the high-water mark: CUDA tensors allocated; on a CPU the process's resident
    memory (weights, activations, allocator caches, and torch's own libraries)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    kib = 1 if sys.platform == 'darwin' else 1024        # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib


# ----------------------------------------------------------------------------- levers
def enable_grad_ckpt(backbone):
    """Activation checkpointing of each ViT block (vit.py's switch): recomputed in backward, not
    stored, ~1/3 more compute for a much smaller footprint; no-op under no_grad."""
    if not isinstance(backbone, vit.VisionTransformer):
        raise launch.UserError('--grad-ckpt checkpoints ViT blocks; not implemented for ResNets')
    backbone.grad_ckpt = True


def optimizer_variants():
    """name -> factory(params) of every optimizer implementation --compare-optimizers times."""
    adamw = lambda **kw: lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, **kw)
    lars = lambda ps: LARS(ps, lr=1e-3, weight_decay=1e-6, momentum=0.9)  # noqa: E731
    lamb = lambda ps: LAMB(ps, lr=1e-4, weight_decay=0.1)  # noqa: E731
    return {'adamw loop': adamw(foreach=False), 'adamw foreach': adamw(foreach=True),
            'adamw fused': adamw(fused=True), 'lars': lars, 'lamb': lamb}


# the implementation each --optimizer uses in the timed steps: what train_pretrain.py runs
OPTIMIZER_IMPL = {'adamw': 'adamw foreach', 'lars': 'lars', 'lamb': 'lamb'}


def momentum_update_variants(model, m):
    """moco.py's update (the official per-tensor loop) against multi-tensor kernels, timed only:
    the same arithmetic in a few launches (what moco.py used before: kept out, it saved < 5% of a
    step), and one lerp, theta_k + (1 - m)(theta_q - theta_k): fewer passes, not the same bits."""
    ks, qs = list(model.momentum_encoder.parameters()), list(model.base_encoder.parameters())

    @torch.no_grad()
    def multi_tensor():
        torch._foreach_mul_(ks, m)
        torch._foreach_add_(ks, torch._foreach_mul(qs, 1.0 - m))

    @torch.no_grad()
    def lerp():
        torch._foreach_lerp_(ks, qs, 1.0 - m)
    return {'loop (moco.py, official)': lambda: model.update_momentum_encoder(m),
            'multi-tensor (same bits)': multi_tensor, 'multi-tensor lerp (other rounding)': lerp}


# ----------------------------------------------------------------------------- training mode
def backbone_kwargs(args):
    """--kw KEY=VALUE (Python literals, else strings), the image and patch size for a ViT."""
    kwargs = {}
    for item in args.kw:
        key, sep, value = item.partition('=')
        if not sep:
            raise launch.UserError(f'--kw expects KEY=VALUE, got {item!r}')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    if args.arch in vit.ARCHS:
        kwargs.setdefault('img_size', args.img_size)
        if args.patch_size:
            kwargs.setdefault('patch_size', args.patch_size)
    return kwargs


def bench_training(args):
    try:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError:
        raise launch.UserError(f'unknown --device {args.device!r} (cpu, cuda or cuda:i)') from None
    cuda = device.type == 'cuda'
    if device.type not in ('cpu', 'cuda') or (cuda and not torch.cuda.is_available()):
        raise launch.UserError(f'--device {device} is not available here (cpu, or cuda if present)')
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise launch.UserError('--batch-size and --steps must be >= 1, --warmup >= 0')
    if args.arch not in moco.ARCHS:
        raise launch.UserError(f"unknown arch {args.arch!r} (one of: {', '.join(moco.ARCHS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_dtype = launch.amp_dtype(args.dtype, device)      # None: plain fp32
    dtype_name = launch.dtype_name(amp_dtype)
    if cuda and amp_dtype is None:
        # fp32 is IEEE fp32 in the step and in the matmul peak alike: cuDNN convolutions run
        # TF32 by default (a 10-bit mantissa), which set against an fp32 peak inflated the MFU
        torch.backends.cuda.matmul.fp32_precision = 'ieee'
        torch.backends.cudnn.conv.fp32_precision = 'ieee'
    amp = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype_name == 'fp16')

    kwargs = backbone_kwargs(args)
    try:
        model = moco.build_moco(args.arch, args.moco_dim, args.moco_mlp_dim, T=0.2, **kwargs)
    except TypeError as e:                        # a --kw the backbone does not take
        raise launch.UserError(str(e)) from None
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    make_batch = lambda b: (torch.randn(b, 3, args.img_size, args.img_size, generator=g)
                            .to(device, memory_format=fmt))
    x1, x2 = make_batch(args.batch_size), make_batch(args.batch_size)
    m, B = 0.99, args.batch_size

    flops_step = step_flops(model, make_batch, B, amp)   # before checkpointing and compiling
    peak_n = args.peak_n or (4096 if cuda else 2048)
    peak, peak_cpu = matmul_peak(device, amp_dtype or torch.float32, peak_n)
    if args.grad_ckpt:
        enable_grad_ckpt(model.base_encoder)
    if args.compile:  # in place: the same modules serve the real step and the phase-split one
        for mod in (model.base_encoder, model.momentum_encoder, model.predictor):
            mod.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_variants()[OPTIMIZER_IMPL[args.optimizer]](params)
    mem_kind = reset_peak_memory(device)    # the steps' own peak, from here to the last one

    def step():  # what train_pretrain.py does each iteration
        with amp():
            loss = model(x1, x2, m)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def split_step(t):  # the same as MoCo.forward + step(), phase k's seconds appended to t[k]
        with clock(device, t['momentum_update']):
            model.update_momentum_encoder(m)
        with clock(device, t['query_forward']), amp():
            q1 = model.predictor(model.base_encoder(x1))
            q2 = model.predictor(model.base_encoder(x2))
        with clock(device, t['momentum_forward']), torch.no_grad(), amp():
            k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
        with clock(device, t['loss']), amp():
            loss = moco.contrastive_loss(q1, k2, model.T) + moco.contrastive_loss(q2, k1, model.T)
        with clock(device, t['backward']):
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        with clock(device, t['optimizer']):
            scaler.step(opt)
            scaler.update()

    first, = timed(step, device)  # includes compilation with --compile
    for _ in range(max(args.warmup - 1, 0)):
        step()
    step_cpu = []
    step_ms = median_ms(timed(step, device, args.steps, step_cpu))
    warm, splits = ({k: [] for k in PHASES} for _ in range(2))
    for _ in range(min(args.warmup, 1)):
        split_step(warm)
    for _ in range(args.steps):
        split_step(splits)
    mem = peak_memory(device)
    phases = {k: median_ms(splits[k]) for k in PHASES}
    # again after the steps: the best of both
    peak2, peak_cpu2 = matmul_peak(device, amp_dtype or torch.float32, peak_n)
    peak, peak_cpu = max(peak, peak2), max(peak_cpu, peak_cpu2)
    # CPU only: the same ratio from CPU seconds (step and peak alike, per thread), which a busy
    # machine distorts far less than wall-clock time; on CUDA process time says nothing
    mfu_cpu_time = (flops_step / (statistics.median(step_cpu) / torch.get_num_threads()) / peak_cpu
                    if not cuda else None)
    step_s, total = step_ms / 1e3, sum(phases.values())
    res = dict(mode='train', arch=args.arch, backbone_kwargs=kwargs, batch_size=B,
               img_size=args.img_size, dtype=dtype_name, dtype_default=args.dtype is None,
               device=str(device),
               device_name=torch.cuda.get_device_name(device) if cuda else 'cpu',
               threads=torch.get_num_threads(), load_avg=list(os.getloadavg()),
               optimizer=args.optimizer, compile=args.compile, grad_ckpt=args.grad_ckpt,
               channels_last=args.channels_last, optimizer_impl=OPTIMIZER_IMPL[args.optimizer],
               trainable_params=sum(p.numel() for p in params),
               images_per_s=B / step_s, step_ms=step_ms, phases_ms=phases, phases_total_ms=total,
               update_and_optimizer_share=(phases['momentum_update'] + phases['optimizer']) / total,
               compile_s=(first - step_s) if args.compile else None,
               flops_per_step=flops_step, flops_per_image=flops_step / B,
               achieved_flops_per_s=flops_step / step_s, peak_matmul_flops_per_s=peak,
               peak_matmul_n=peak_n, mfu=flops_step / step_s / peak, mfu_cpu_time=mfu_cpu_time,
               peak_memory_bytes=mem, peak_memory_kind=mem_kind)

    # Momentum update and optimizer steps alone: multi-tensor / fused kernels against loops
    res['momentum_update_ms'] = {name: median_ms(timed(fn, device, args.steps))
                                 for name, fn in momentum_update_variants(model, m).items()}
    if args.compare_optimizers:
        del opt
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3

        def optimizer_ms(o):
            o.step()  # creates the state
            return median_ms(timed(o.step, device, args.steps))
        res['optimizer_ms'] = {name: optimizer_ms(make(params))
                               for name, make in optimizer_variants().items()}
    return res


def print_training(r):
    gb, g = 2 ** 30, 1e9
    levers = [k for k in ('compile', 'grad_ckpt', 'channels_last') if r[k]]
    print(f"{r['arch']} {r['backbone_kwargs']} | batch {r['batch_size']} x 2 crops, "
          f"{r['img_size']} px | {r['dtype']}{' (the default here)' * r['dtype_default']} on "
          f"{r['device_name']} "
          f"({r['threads']} threads, load {r['load_avg'][0]:.2f}) | {r['optimizer']} | "
          f"{', '.join(levers) or 'no levers'} | {r['trainable_params'] / 1e6:.1f} M params")
    print(f"{'step (model(x1, x2, m) + backward + optimizer)':<48} {r['step_ms']:10.1f} ms  "
          f"{r['images_per_s']:8.1f} images/s")
    for k, v in r['phases_ms'].items():
        print(f"  {k:<46} {v:10.1f} ms  {100 * v / r['phases_total_ms']:6.1f} %")
    print(f"  {'sum of phases':<46} {r['phases_total_ms']:10.1f} ms  (momentum update + optimizer "
          f"{100 * r['update_and_optimizer_share']:.1f} % of it)")
    if r['compile_s'] is not None:
        print(f"{'compile time (first step - steady step)':<48} {r['compile_s']:10.1f} s")
    print(f"{'FLOPs per image (fwd + bwd, 2 crops)':<48} {r['flops_per_image'] / g:10.2f} GFLOP")
    print(f"{'achieved':<48} {r['achieved_flops_per_s'] / g:10.1f} GFLOP/s")
    print(f"{'matmul peak (' + str(r['peak_matmul_n']) + '^3, ' + r['dtype'] + ')':<48} "
          f"{r['peak_matmul_flops_per_s'] / g:10.1f} GFLOP/s  -> {100 * r['mfu']:.1f} % of peak")
    if r['mfu_cpu_time'] is not None:
        print(f"{'  the same share from process CPU time':<48} {100 * r['mfu_cpu_time']:10.1f} %  "
              f"(with --threads 1: robust to other jobs)")
    print(f"{'peak memory, ' + r['peak_memory_kind']:<48} {r['peak_memory_bytes'] / gb:10.2f} GiB")
    for title, key in (('momentum update', 'momentum_update_ms'),
                       ('optimizer step', 'optimizer_ms')):
        for name, v in r.get(key, {}).items():
            print(f"{title + ', ' + name:<48} {v:10.2f} ms")


# ----------------------------------------------------------------------------- data mode
def bench_data(args):
    """Images/s of one worker (one thread): decode + the two augmented crops of pretraining."""
    import torchvision
    from PIL import Image
    from torchvision.transforms import v2 as T
    aug1, aug2 = augment.pretrain_transforms(args.img_size, 0.08)
    if args.data_images < 1:
        raise launch.UserError('--data-images must be >= 1')
    torch.set_num_threads(1)  # a DataLoader worker runs one thread

    def kernel_blur(aug):  # torchvision's blur (odd kernel ~10% of the crop, BYOL's 23 px at 224)
        k = int(0.1 * args.img_size) // 2 * 2 + 1
        return T.Compose([T.RandomApply([T.GaussianBlur(k, sigma=op.transforms[0].sigma)], p=op.p)
                          if (isinstance(op, T.RandomApply)
                              and isinstance(op.transforms[0], augment.GaussianBlur))
                          else op
                          for op in aug.transforms])

    def decode_tensor(path):  # torchvision.io: file -> uint8 (3, H, W); v2 ops then run on tensors
        raw = torchvision.io.read_file(path)  # decode_image takes paths only from torchvision 0.20
        return torchvision.io.decode_image(raw, mode=torchvision.io.ImageReadMode.RGB)
    pil, kernel = augment.TwoCrops(aug1, aug2), augment.TwoCrops(*map(kernel_blur, (aug1, aug2)))
    pipelines = {'PIL decode, v2 ops on PIL images, PIL blur (training)': (data.load_image, pil),
                 'PIL decode, v2 ops on PIL images, torchvision kernel blur':
                 (data.load_image, kernel),
                 'torchvision.io decode, v2 ops on uint8 tensors (kernel blur)':
                 (decode_tensor, kernel)}
    w, h = args.data_src_size
    g = torch.Generator().manual_seed(0)
    res = dict(mode='data', format=args.data_format, src_size=[w, h], img_size=args.img_size,
               images=args.data_images, threads=1, load_avg=list(os.getloadavg()),
               decode_per_s={}, decode_aug_per_s={}, crops={})
    with tempfile.TemporaryDirectory() as root:
        paths = []
        # smooth colour fields + noise: compress like photos, not like noise
        for i in range(args.data_images):
            low = torch.rand(1, 3, h // 25 + 2, w // 25 + 2, generator=g)
            img = F.interpolate(low, size=(h, w), mode='bicubic', align_corners=False)[0]
            img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1).mul(255).byte()
            paths.append(os.path.join(root, f'{i}.{args.data_format}'))
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1], quality=90)
        res['mean_file_kb'] = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        cpu = torch.device('cpu')
        for name, (load, aug) in pipelines.items():
            # warm up; the output layout shows both paths feed the model alike
            res['crops'][name] = [[list(c.shape), str(c.dtype)] for c in aug(load(paths[0]))]
            for key, fn in (('decode_per_s', load), ('decode_aug_per_s', lambda p: aug(load(p)))):
                res[key][name] = len(paths) / timed(lambda: [fn(p) for p in paths], cpu)[0]
    return res


def print_data(r):
    print(f"data: {r['images']} {r['format']} files of {r['src_size'][0]}x{r['src_size'][1]} "
          f"(~{r['mean_file_kb']:.0f} KiB) -> two {r['img_size']} px crops | 1 thread = 1 worker | "
          f"load {r['load_avg'][0]:.2f}")
    for name in r['decode_per_s']:
        print(f"  {name:<62} decode {r['decode_per_s'][name]:7.1f} /s   decode + 2 crops "
              f"{r['decode_aug_per_s'][name]:7.1f} images/s")


def main(args):
    res = bench_data(args) if args.data else bench_training(args)
    if args.json:
        print(json.dumps(res))
    else:
        (print_data if args.data else print_training)(res)
    return res


if __name__ == '__main__':
    launch.exit_on_user_error(lambda: main(get_args_parser().parse_args()))

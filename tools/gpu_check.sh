#!/usr/bin/env bash
# One GPU check of this MoCo v3 implementation: on one CUDA GPU, what the CPU-only tests cannot show.
#
#   1. Pretraining on the built-in demo data (data/moco_demo, 32 px), 2 epochs a run; the loss must fall
#      (first vs last logged step of log.jsonl):
#      - the demo ViT in fp16 (+ GradScaler), one process under torchrun: NCCL at world size 1, DDP,
#        pinned memory; it builds the demo data for the runs after it;
#      - the demo ViT in bf16 and a ResNet-18 in fp16 (LARS + GradScaler), each as TWO processes on the one
#        GPU over gloo (MOCO_DIST_BACKEND=gloo: NCCL refuses two ranks on one device), CUDA tensors all
#        the way: DDP's gradient all-reduce, SyncBatchNorm's statistics across the two processes (its
#        gloo path), the keys of both gathered by concat_all_gather, DistributedSampler's shards;
#      - `--resume auto` of the bf16 ViT to a 3rd epoch (its log continued, not rewritten; "resumed from"
#        printed), then train_linear.py --knn (features gathered across ranks) and train_finetune.py
#        (evaluation sums all-reduced over uneven shards) on that checkpoint, two processes each.
#   2. bench.py rows, bf16, one process: ViT-B/16 with --compile (first: its ~2 minutes of compiling
#      always fit) and without (images/s, MFU against the measured matmul peak, phase split);
#      ResNet-50 channels_last with LARS (+ the optimizer implementations); ViT-S at increasing batches,
#      with and without --grad-ckpt in turn, each up to its first out-of-memory (peak memory per image;
#      batch 512 per GPU = the paper's 4096 on 8 GPUs).
#   3. OUTDIR/results.json and OUTDIR/results.md (rows for BENCHMARKS.md), and each step's log in OUTDIR.
#
# Not checked: NCCL between GPUs (its all-reduce and all-gather over NVLink or the network) and any
# multi-GPU speed; the two processes here share one GPU and talk through the host (gloo), so their
# images/s say nothing about 8 GPUs. torch.compile of the DDP-wrapped model (train_pretrain.py
# --compile) is not run either: the compile row is bench's, one process.
#
# Budget: 450 s for all the steps, ~7.5 minutes on one H100 (a pretraining run ~20-30 s, a bench row
# ~15 s, --compile ~2 min), so that a 15-minute GPU session has time for a rerun. Each step runs under
# `timeout`; the limits of the steps before the --compile row add up to 250 s, which leaves it its 200 s,
# and the rows after it share what is left (a step left without time is recorded as skipped). A failed
# step is recorded with its last lines and the check goes on; the exit status is non-zero at the end if
# any step or check failed.
#
#   bash tools/gpu_check.sh [OUTDIR]             # default OUTDIR: output/gpu_check in the repository
#   bash tools/gpu_check.sh --dry-run [OUTDIR]   # print every command, one per line; needs no GPU
set -u

OUT=
DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,35s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (use --dry-run, OUTDIR)" >&2; exit 2 ;;
        *) OUT=$(realpath -m -- "$arg") ;;    # absolute: the commands run in the repository root
    esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/output/gpu_check}
export PYTHONUNBUFFERED=1                     # a log holds every line printed, also after a timeout
PY=python3                                    # python where there is no python3
command -v python3 > /dev/null || PY=python
# torchrun is this module's command: run through $PY it is the interpreter checked below, also
# where no torchrun is on the PATH. --standalone: a free port for each run.
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
TWO_RANKS="env MOCO_DIST_BACKEND=gloo $PY -m torch.distributed.run --standalone --nproc_per_node=2"
BUDGET=450                                    # seconds for all the steps; the summary takes one

if ((!DRY)); then
    # one line: the JSON of the GPU, or why there is none (the real cause when torch does not import)
    env_json=$($PY -c '
import json, sys
try:
    import torch
except Exception as e:      # a missing package, a CUDA library that does not load, ...
    print(f"{sys.executable} cannot import torch: " + f"{type(e).__name__}: {e}".splitlines()[-1])
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"no CUDA GPU here: torch {torch.__version__} (CUDA {torch.version.cuda}) finds none "
          "(torch.cuda.is_available() is False); see --dry-run")
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(json.dumps(dict(device=p.name, memory_gib=p.total_memory / 2**30, torch=torch.__version__,
                      cuda=torch.version.cuda)))' 2> /dev/null)
    rc=$?
    if ((rc != 0)); then
        cause=$(tail -n 1 <<< "$env_json")
        echo "gpu_check: ${cause:-$PY -c 'import torch' failed (exit $rc; is $PY installed?)}" >&2
        exit 1
    fi
    mkdir -p "$OUT"
    echo "$env_json" > "$OUT/env.json"
    : > "$OUT/steps.tsv"
    echo "gpu_check: $env_json -> $OUT"
fi

# step NAME LIMIT CMD...: runs CMD under `timeout` (LIMIT seconds, less if the budget has less), its output
# in OUT/NAME.log, and adds a row to OUT/steps.tsv: name, status, exit code, seconds, command.
# Returns CMD's exit status; a dry run only prints the command.
step() {
    local name=$1 limit=$2
    shift 2
    if ((DRY)); then
        echo "timeout $limit$(printf ' %q' "$@")"
        return 0
    fi
    local t0=$SECONDS left=$((BUDGET - SECONDS)) status rc
    if ((left < 10)); then
        printf '%s\tskipped\t-1\t0\t%s\n' "$name" "$*" >> "$OUT/steps.tsv"
        echo "[skipped] $name: the $BUDGET-s budget is spent"
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "[start] $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    status=ok
    ((rc != 0)) && status=failed
    ((rc == 124 || rc == 137)) && status=timeout
    grep -qE 'OutOfMemoryError|CUDA out of memory' "$OUT/$name.log" && status=oom
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$*" >> "$OUT/steps.tsv"
    echo "[$status] $name: $((SECONDS - t0)) s (total $SECONDS s)"
    return $rc
}

# ----------------------------------------------------------------------------- 1. pretraining and evaluation
# --preset demo: the built-in data (made once, by the first run), 32-px images, batch 128 (64 per process
# with two), 39 steps an epoch. With --arch resnet18 the preset keeps its schedule but neither its ViT shape
# nor its lr (2e-3, an AdamW lr, would leave LARS nearly still): the ResNet recipe's base lr, 0.6, here
# also given explicitly. Limits until the compile row: 50 + 50 + 50 + 30 + 35 + 35 = 250 s.
step pretrain_vit_fp16 50 $TORCHRUN train_pretrain.py --preset demo --dtype fp16 --epochs 2 \
    -p 5 -j 8 --output-dir "$OUT/pretrain_vit_fp16"
step pretrain_vit_bf16 50 $TWO_RANKS train_pretrain.py --preset demo --dtype bf16 --epochs 2 \
    -p 5 -j 4 --output-dir "$OUT/pretrain_vit_bf16"
step pretrain_resnet18_fp16 50 $TWO_RANKS train_pretrain.py --preset demo --arch resnet18 --lr 0.6 \
    --dtype fp16 --epochs 2 -p 5 -j 4 --output-dir "$OUT/pretrain_resnet18_fp16"
# the log before resuming: a resumed run keeps its rows, a restarted one rewrites them
((DRY)) || cp "$OUT/pretrain_vit_bf16/log.jsonl" "$OUT/resume_vit_bf16.before.jsonl" 2> /dev/null
step resume_vit_bf16 30 $TWO_RANKS train_pretrain.py --preset demo --dtype bf16 --epochs 3 \
    -p 5 -j 4 --resume auto --output-dir "$OUT/pretrain_vit_bf16"
CKPT=$OUT/pretrain_vit_bf16/checkpoint_last.pth
step linear_vit_bf16 35 $TWO_RANKS train_linear.py --pretrained "$CKPT" --epochs 2 -b 256 --knn --dtype bf16 \
    -j 4 --output-dir "$OUT/linear_vit_bf16" data/moco_demo
step finetune_vit_bf16 35 $TWO_RANKS train_finetune.py --pretrained "$CKPT" --epochs 2 -b 128 \
    --warmup-epochs 0 -j 4 --output-dir "$OUT/finetune_vit_bf16" data/moco_demo

# ----------------------------------------------------------------------------- 2. bench rows
# --peak-n 8192: a larger matmul comes closer to the GPU's peak than bench's 4096 (a lower, safer MFU)
BENCH="$PY bench.py --device cuda --dtype bf16 --peak-n 8192 --json"
step bench_vit_base_b256_compile 200 $BENCH --arch vit_base -b 256 --compile   # slow: first, in budget
step bench_vit_base_b256 60 $BENCH --arch vit_base -b 256
step bench_resnet50_b256_channels_last 60 $BENCH --arch resnet50 -b 256 --channels-last \
    --optimizer lars --compare-optimizers
# both sweeps in turn, so that a spent budget cuts them alike; each ends at its first failure (an
# out of memory, expected), the checkpointed one later
plain=1
for b in 512 1024 2048 4096; do
    if ((plain)); then
        step bench_vit_small_b$b 60 $BENCH --arch vit_small -b $b --warmup 1 --steps 3 \
            || ((DRY)) || plain=0
    fi
    step bench_vit_small_b${b}_grad_ckpt 60 $BENCH --arch vit_small -b $b --warmup 1 --steps 3 \
        --grad-ckpt || ((DRY)) || break
done
((DRY)) && exit 0

# ----------------------------------------------------------------------------- 3. results
$PY - "$OUT" << 'EOF'
"""OUT/steps.tsv, the runs' log.jsonl and bench's JSON lines -> results.json and results.md. Exits 1 if
a step failed (an out-of-memory only ends a ViT-S sweep) or a check (the loss fell, the run resumed)
did not hold."""
import json, os, re, sys

out, GiB = sys.argv[1], 2 ** 30
keys = ('name', 'status', 'rc', 'seconds', 'command')
steps = [dict(zip(keys, line.rstrip('\n').split('\t'))) for line in open(f'{out}/steps.tsv')]
res = dict(env=json.load(open(f'{out}/env.json')), steps=steps, pretrain=[], bench=[], problems=[])
fmt = lambda v, spec='.4f': '—' if v is None else format(v, spec)


def log_lines(name):
    path = f'{out}/{name}.log'
    return open(path, errors='replace').read().splitlines() if os.path.exists(path) else []


def jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


for s in steps:
    s['seconds'], s['rc'] = int(s['seconds']), int(s['rc'])
    if s['status'] != 'ok' and not (s['status'] == 'oom' and s['name'].startswith('bench_vit_small')):
        s['last_lines'] = [line[-300:] for line in log_lines(s['name'])[-15:]]   # tqdm's lines are long
        res['problems'].append(f"{s['name']}: {s['status']} (exit {s['rc']})")

# ---- pretraining: first and last logged step loss of each run; the resumed epoch
for s in steps:
    name = s['name']
    if not name.startswith(('pretrain_', 'resume_')):
        continue
    log = f"{out}/{name.replace('resume_', 'pretrain_')}/log.jsonl"
    before = f"{out}/{name.replace('pretrain_', 'resume_')}.before.jsonl"   # the run's rows, pre-resume
    rows = jsonl(before if name.startswith('pretrain_') and os.path.exists(before) else log)
    if name.startswith('resume_'):
        rows = [r for r in rows if r['epoch'] == 3]
    knn = [r['knn_top1'] for r in rows if r.get('knn_top1') is not None]
    rows = [r for r in rows if 'loss' in r]
    ranks = int(re.search(r'--nproc_per_node=(\d+)', s['command']).group(1))
    backend = 'gloo' if 'MOCO_DIST_BACKEND=gloo' in s['command'] else 'nccl'
    run = dict(name=name, status=s['status'], seconds=s['seconds'], steps_logged=len(rows),
               processes=ranks, backend=backend,
               knn_first=knn[0] if knn else None, knn_last=knn[-1] if knn else None)
    if rows:
        run.update(epochs=rows[-1]['epoch'], first_loss=rows[0]['loss'], last_loss=rows[-1]['loss'],
                   fell=rows[-1]['loss'] < rows[0]['loss'], img_s=rows[-1].get('img_s'))
    if name.startswith('pretrain_') and s['status'] == 'ok' and not run.get('fell'):
        res['problems'].append(f"{name}: the loss did not fall ({run.get('first_loss')} -> "
                               f"{run.get('last_loss')})")
    if name.startswith('resume_') and s['status'] == 'ok':
        # resumed: the rows of epochs 1-2 are kept as they were (a rerun differs, in img_s at least)
        # and epoch 3 is added
        kept = [r for r in jsonl(f'{out}/{name}.before.jsonl') if r['epoch'] <= 2]
        run['resumed'] = bool(kept) and jsonl(log)[:len(kept)] == kept and run.get('epochs') == 3
        # train_pretrain.py says "resumed from <path> at epoch <N>" at the start of a resumed run
        run['said_resumed'] = any('resumed from' in line for line in log_lines(name))
        if not (run['resumed'] and run['said_resumed']):
            res['problems'].append(f'{name}: not resumed (the rows of epochs 1-2 kept, epoch 3 added, '
                                   f'"resumed from" printed: {run["resumed"]}, {run["said_resumed"]})')
    res['pretrain'].append(run)

for s in steps:
    rows = [r for r in jsonl(f"{out}/{s['name']}/log.jsonl") if 'val_top1' in r]
    if s['name'].startswith(('linear_', 'finetune_')) and rows:
        res[s['name']] = dict(epochs=len(rows), val_top1=rows[-1]['val_top1'], seconds=s['seconds'])

# ---- bench: each row's JSON line; per ViT-S sweep the largest batch that fit
for s in steps:
    if not s['name'].startswith('bench_'):
        continue
    lines = [line for line in log_lines(s['name']) if line.startswith('{"mode"')]
    if lines:
        r = dict(json.loads(lines[-1]), name=s['name'], seconds=s['seconds'])
        r['gib_per_image'] = r['peak_memory_bytes'] / GiB / r['batch_size']
        res['bench'].append(r)
    elif s['status'] == 'ok':
        res['problems'].append(f"{s['name']}: no JSON line in its log")
for kind in ('plain', 'grad_ckpt'):
    rs = [r for r in res['bench'] if r['arch'] == 'vit_small' and r['grad_ckpt'] == (kind == 'grad_ckpt')]
    if not rs:
        continue
    at = {r['batch_size']: r['peak_memory_bytes'] / GiB for r in rs}
    (b1, m1), (b2, m2) = list(at.items())[-2:] if len(at) > 1 else [(0, 0)] * 2
    res[f'vit_small_{kind}'] = dict(
        largest_batch=max(at), peak_gib=at,
        oom_after=any(s['status'] == 'oom' and s['name'].startswith('bench_vit_small')
                      and s['name'].endswith('grad_ckpt') == (kind == 'grad_ckpt') for s in steps),
        gib_per_extra_image=(m2 - m1) / (b2 - b1) if b2 != b1 else None,   # activations of one image
        # 4096 on 8 GPUs = 512 per GPU; an "80 GB" card holds about 79 GiB
        batch_512_under_79_gib=at[512] < 79 if 512 in at else None)

# ---- results.md: the rows for BENCHMARKS.md
e = res['env']
md = [f"# GPU check: {e['device']} ({e['memory_gib']:.0f} GiB), torch {e['torch']}, CUDA {e['cuda']}",
      '', '| step | status | seconds |', '|---|---|---|']
md += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in steps]
md += ['', '| demo data, torchrun, 1 GPU | processes | epochs | first loss | last loss '
       '| fell (resume: resumed) | kNN top-1 first → last | img/s | seconds |',
       '|---|---|---|---|---|---|---|---|---|']
for r in res['pretrain']:
    md.append(f"| {r['name']} | {r['processes']} ({r['backend']}) | {r.get('epochs', '—')} | "
              f"{fmt(r.get('first_loss'))} | "
              f"{fmt(r.get('last_loss'))} | {r.get('resumed', r.get('fell', '—'))} | "
              f"{fmt(r['knn_first'], '.1f')} → {fmt(r['knn_last'], '.1f')} | "
              f"{fmt(r.get('img_s'), '.0f')} | {r['seconds']} |")
for name in ('linear_vit_bf16', 'finetune_vit_bf16'):
    if name in res:
        md.append(f"| {name} | 2 (gloo) | {res[name]['epochs']} | | | | "
                  f"val top-1 {res[name]['val_top1']:.1f} | | {res[name]['seconds']} |")
md += ['', f"{e['device']}, bf16, 224 px, one process, the optimizer in brackets (train_pretrain.py's "
       'implementation), median of the timed steps, MFU against the bf16 matmul peak bench measures '
       '(8192³):', '',
       '| model | batch | images/s | step ms | MFU | TFLOP/s (peak) | momentum update + optimizer '
       '| ms: momentum update, q fwd, k fwd, loss, bwd, optimizer | peak memory | GiB / image '
       '| compile s |', '|---|---|---|---|---|---|---|---|---|---|---|']
for r in res['bench']:
    levers = ''.join(f", {k.replace('_', '-')}" for k in ('compile', 'grad_ckpt', 'channels_last') if r[k])
    md.append(f"| {r['arch']}{levers} ({r['optimizer_impl']}) | {r['batch_size']} | "
              f"{r['images_per_s']:.0f} | "
              f"{r['step_ms']:.1f} | {100 * r['mfu']:.1f} % | {r['achieved_flops_per_s'] / 1e12:.0f} "
              f"({r['peak_matmul_flops_per_s'] / 1e12:.0f}) | "
              f"{100 * r['update_and_optimizer_share']:.1f} % | "
              + ' / '.join(f'{v:.1f}' for v in r['phases_ms'].values())
              + f" | {r['peak_memory_bytes'] / GiB:.1f} GiB | {r['gib_per_image']:.3f} | "
              f"{fmt(r['compile_s'], '.0f')} |")
for r in res['bench']:
    if r.get('optimizer_ms'):
        md += ['', f"{r['arch']}: one optimizer step alone ({r['trainable_params'] / 1e6:.1f}M "
               'parameters), ms: ' + ', '.join(f'{k} {v:.2f}' for k, v in r['optimizer_ms'].items())
               + '; momentum update, ms: '
               + ', '.join(f'{k} {v:.2f}' for k, v in r['momentum_update_ms'].items())]
for kind in ('plain', 'grad_ckpt'):
    if f'vit_small_{kind}' in res:
        v = res[f'vit_small_{kind}']
        md += ['', f"ViT-S/16{' --grad-ckpt' if kind == 'grad_ckpt' else ''}: largest batch that fit "
               f"{v['largest_batch']}{', then out of memory' if v['oom_after'] else ''}; peak GiB at batch "
               + ', '.join(f'{b}: {g:.1f}' for b, g in v['peak_gib'].items())
               + f"; {fmt(v['gib_per_extra_image'])} GiB per extra image; batch 512 (4096 on 8 GPUs) "
               f"under 79 GiB: {v['batch_512_under_79_gib']}"]
md += ['', '## Problems', '', *[f'- {p}' for p in res['problems']]] if res['problems'] else \
    ['', 'All steps and checks passed.']
for s in steps:
    if 'last_lines' in s:
        md += ['', f"### {s['name']} ({s['status']}, exit {s['rc']})", '', '```', *s['last_lines'], '```']

json.dump(res, open(f'{out}/results.json', 'w'), indent=1)
open(f'{out}/results.md', 'w').write('\n'.join(md) + '\n')
print('\n'.join(md))
sys.exit(1 if res['problems'] else 0)
EOF
rc=$?
echo "gpu_check: $SECONDS s in all; results in $OUT/results.json and $OUT/results.md"
exit $rc

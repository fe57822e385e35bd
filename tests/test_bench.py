"""bench.py on tiny configs (CPU, 1-2 steps): FLOPs against a hand count and against a plain
FlopCounterMode step, a FLOP count that runs no step of the benchmarked batch before the memory
is measured, the CPU's peak-memory reset, the dtype (default and peak) on a CPU, consistency of the
reported figures, activation checkpointing, the JSON keys, the data mode, bad input. Not a timing
test: no figure is compared with a speed."""
import copy
import json
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import launch  # noqa: E402
import moco  # noqa: E402

B, D, HEADS, IMG, PATCH, MLP, DIM = 2, 32, 2, 32, 16, 64, 16
TINY_VIT = ['--arch', 'vit_tiny', '--kw', 'depth=1', '--kw', f'embed_dim={D}',
            '--kw', f'num_heads={HEADS}', '--img-size', str(IMG), '--patch-size', str(PATCH)]
COMMON = ['-b', str(B), '--moco-mlp-dim', str(MLP), '--moco-dim', str(DIM), '--device', 'cpu',
          '--steps', '1', '--warmup', '1', '--peak-n', '128', '--threads', '1']
TRAIN_KEYS = {'images_per_s', 'step_ms', 'phases_ms', 'phases_total_ms',
              'update_and_optimizer_share', 'flops_per_step', 'flops_per_image',
              'achieved_flops_per_s', 'peak_matmul_flops_per_s', 'mfu', 'mfu_cpu_time',
              'peak_memory_bytes', 'peak_memory_kind', 'compile_s', 'momentum_update_ms',
              'load_avg', 'threads', 'dtype', 'dtype_default'}


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(argv):
    return bench.main(bench.get_args_parser().parse_args(argv))


def vit_step_flops_by_hand(B=B):
    """Matmul FLOPs (2 per multiply-add) of one MoCo v3 step of B images for the tiny ViT, term by
    term."""
    L = (IMG // PATCH) ** 2
    N = L + 1
    patch = 2 * L * (3 * PATCH * PATCH) * D
    block = 2 * N * 12 * D * D  # qkv 3D^2, proj D^2, fc1 4D^2, fc2 4D^2 per token
    attn = 2 * 2 * N * N * D  # q k^T and (softmax) v, summed over heads
    projector = 2 * (D * MLP + MLP * MLP + MLP * DIM)  # 3 layers on the class token
    predictor = 2 * (DIM * MLP + MLP * DIM)
    # query encoder: forward + backward (2x: input and weight grads), except the patch projection,
    # whose input (the image) needs no gradient; momentum encoder: forward only
    query = ((patch + block + attn + projector + predictor)
             + (patch + 2 * (block + attn + projector + predictor)))
    key = patch + block + attn + projector
    # two losses: q k^T forward, its q-gradient backward
    loss = 2 * (2 * B * B * DIM + 2 * B * B * DIM)
    return 2 * B * (query + key) + loss  # 2 crops of B images through each encoder


def test_vit_flops_match_hand_count_and_figures_agree():
    r = run(TINY_VIT + COMMON + ['--compare-optimizers'])
    assert r['flops_per_step'] == vit_step_flops_by_hand()
    assert r['flops_per_image'] == r['flops_per_step'] / B
    assert all(r['phases_ms'][k] > 0 for k in bench.PHASES)
    assert r['phases_total_ms'] == pytest.approx(sum(r['phases_ms'].values()))
    assert r['images_per_s'] == pytest.approx(B / (r['step_ms'] / 1e3))
    assert r['achieved_flops_per_s'] == pytest.approx(r['flops_per_step'] / (r['step_ms'] / 1e3))
    assert r['mfu'] == pytest.approx(r['achieved_flops_per_s'] / r['peak_matmul_flops_per_s'])
    assert r['mfu_cpu_time'] > 0
    share = (r['phases_ms']['momentum_update'] + r['phases_ms']['optimizer']) / r['phases_total_ms']
    assert r['update_and_optimizer_share'] == pytest.approx(share)
    assert r['peak_memory_bytes'] > 0 and 'RSS' in r['peak_memory_kind']
    assert set(r['optimizer_ms']) == {'adamw loop', 'adamw foreach', 'adamw fused', 'lars', 'lamb'}
    assert all(v > 0 for v in r['optimizer_ms'].values()) and len(r['momentum_update_ms']) == 3


def test_resnet_flops_equal_a_plain_counted_step():
    # 5 images: bench counts steps of 2 and 4 and extrapolates (FLOPs = a B + c B^2)
    r = run(['--arch', 'resnet18', '--kw', 'small_stem=True', '--img-size', '8',
             '--optimizer', 'lars'] + COMMON + ['-b', '5'])
    torch.manual_seed(0)
    model = moco.build_moco('resnet18', DIM, MLP, T=0.2, small_stem=True)
    x1, x2 = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    # torch's own formulas: a ResNet has no attention
    with FlopCounterMode(display=False) as counter:
        model(x1, x2, 0.99).backward()
    assert r['flops_per_step'] == counter.get_total_flops() > 0
    assert r['phases_total_ms'] > 0 and r['step_ms'] > 0


def record_steps(monkeypatch):
    """Events of a bench run, in order: the batch of each full step `model(x1, x2, m)`, 'reset'
    where the peak memory starts, and per step the dtype out of the first qkv matmul (autocast);
    ('peak', dtype) for each matmul peak."""
    events, build, reset, peak = [], moco.build_moco, bench.reset_peak_memory, bench.matmul_peak

    def build_recorded(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(lambda mod, inputs: events.append(inputs[0].shape[0]))
        model.base_encoder.blocks[0].attn.qkv.register_forward_hook(
            lambda mod, inputs, out: events.append(out.dtype) if mod.training else None)
        return model
    monkeypatch.setattr(bench.moco, 'build_moco', build_recorded)
    monkeypatch.setattr(bench, 'reset_peak_memory', lambda d: events.append('reset') or reset(d))
    monkeypatch.setattr(bench, 'matmul_peak',
                        lambda d, dtype, n: events.append(('peak', dtype)) or peak(d, dtype, n))
    return events


def test_flop_count_runs_no_step_of_the_measured_batch(monkeypatch):
    """The memory measured is that of the benchmarked step: before the peak-memory reset only
    steps of 2 and 4 images ran (the FLOP count), whatever the batch, so a --grad-ckpt row
    never first runs an uncheckpointed step of its batch; the count is still exact at 5."""
    events = record_steps(monkeypatch)
    r = run(TINY_VIT + COMMON + ['-b', '5', '--grad-ckpt', '--dtype', 'fp32'])
    batches = [e for e in events if isinstance(e, int) or e == 'reset']
    assert batches[:3] == [2, 4, 'reset'] and set(batches[3:]) == {5}
    assert r['flops_per_step'] == vit_step_flops_by_hand(5)
    assert r['peak_memory_kind'] == 'process peak RSS (CPU)'   # Linux: reset where the steps begin


@pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs'), reason='Linux only')
def test_cpu_peak_memory_starts_at_the_reset():
    cpu = torch.device('cpu')
    big = torch.ones(2 ** 26)                       # 256 MiB, every page touched
    del big                                         # glibc returns a block this large to the OS
    before = bench.peak_memory(cpu)
    assert bench.reset_peak_memory(cpu) == 'process peak RSS (CPU)'
    assert bench.peak_memory(cpu) < before - 200 * 2 ** 20


@pytest.mark.parametrize('native_bf16', [True, False])
def test_cpu_dtype_defaults_to_the_native_one_with_its_own_peak(monkeypatch, native_bf16):
    """On a CPU the default dtype is launch.amp_dtype's (bf16 where native); the step runs under
    CPU autocast in it, and the matmul peak is measured in it."""
    monkeypatch.setattr(launch, 'cpu_has_native_bf16', lambda: native_bf16)
    events = record_steps(monkeypatch)
    r = run(TINY_VIT + COMMON)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    assert r['dtype'] == ('bf16' if native_bf16 else 'fp32') and r['dtype_default'] is True
    assert [e for e in events if isinstance(e, tuple)] == [('peak', dtype)] * 2
    assert {e for e in events if isinstance(e, torch.dtype)} == {dtype}
    assert r['flops_per_step'] == vit_step_flops_by_hand()   # FLOPs do not depend on the dtype


def test_cpu_bf16_can_be_asked_and_fp32_kept(monkeypatch):
    monkeypatch.setattr(launch, 'cpu_has_native_bf16', lambda: True)
    events = record_steps(monkeypatch)
    r = run(TINY_VIT + COMMON + ['--dtype', 'fp32'])
    assert r['dtype'] == 'fp32' and r['dtype_default'] is False
    assert {e for e in events if isinstance(e, (tuple, torch.dtype))} == {
        ('peak', torch.float32), torch.float32}


def test_grad_ckpt_recomputes_blocks_and_keeps_gradients():
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.2)
    plain = moco.build_moco('vit_tiny', DIM, MLP, T=0.2, **kw)
    ckpt = copy.deepcopy(plain)
    bench.enable_grad_ckpt(ckpt.base_encoder)
    calls = {'plain': 0, 'ckpt': 0}
    plain.base_encoder.blocks[0].attn.register_forward_hook(
        lambda *a: calls.__setitem__('plain', calls['plain'] + 1))
    ckpt.base_encoder.blocks[0].attn.register_forward_hook(
        lambda *a: calls.__setitem__('ckpt', calls['ckpt'] + 1))
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    losses = []
    for model in (plain, ckpt):
        # the same drop-path masks; checkpointing replays them in the recomputation
        torch.manual_seed(1)
        loss = model(x1, x2, 0.99)
        loss.backward()
        losses.append(loss)
    # one forward per crop, each recomputed once in backward
    assert calls == {'plain': 2, 'ckpt': 4}
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    assert sum(p.grad is not None for p in ckpt.parameters()) > 0


def test_json_has_documented_keys(capsys):
    run(TINY_VIT + COMMON + ['--grad-ckpt', '--json'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert TRAIN_KEYS <= set(out) and set(out['phases_ms']) == set(bench.PHASES)
    # model FLOPs
    assert out['grad_ckpt'] is True and out['flops_per_step'] == vit_step_flops_by_hand()


def test_data_mode_measures_the_pipelines(capsys):
    r = run(['--data', '--data-images', '2', '--img-size', '16', '--data-src-size', '40', '30',
             '--json'])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == json.loads(json.dumps(r))
    assert len(r['decode_per_s']) == len(r['decode_aug_per_s']) == 3 and r['threads'] == 1
    assert any('(training)' in k for k in r['decode_per_s'])
    assert all(r['decode_per_s'][k] > 0 and r['decode_aug_per_s'][k] > 0 for k in r['decode_per_s'])
    # every variant (PIL or tensor decoding, PIL or kernel blur) yields what the model is fed:
    # two float32 crops
    assert all(c == [[[3, 16, 16], 'torch.float32']] * 2 for c in r['crops'].values())


@pytest.mark.parametrize('argv, message', [
    (['--dtype', 'fp16', '--device', 'cpu'], 'needs a CUDA GPU'),
    (['--arch', 'vit_nope', '--device', 'cpu'], 'unknown arch'),
    (['--arch', 'resnet18', '--grad-ckpt', '--device', 'cpu', '--img-size', '8',
      '--moco-mlp-dim', '8'], 'ViT blocks'),
    (['--kw', 'depth', '--device', 'cpu'], 'KEY=VALUE'),
    (['--device', 'gpu0'], '--device'),
])
def test_bad_input_is_one_line(argv, message):
    with pytest.raises(launch.UserError) as e:
        run(argv)
    assert message in str(e.value) and '\n' not in str(e.value)

"""simclr_byol.py: both losses and their gradients by hand, which branch is trained,
the layout shared with MoCo, checkpoint loading, and SimCLR's gathered negatives on 2 processes
(gloo) against 1. Run as a script under torch.distributed.run it is the DDP worker."""
import copy
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import moco  # noqa: E402
import simclr_byol as sb  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP threads spin badly on a shared
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VIT_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


FRAMEWORKS = {"mocov3": moco.MoCo, "simclr": sb.SimCLR, "byol": sb.BYOL}


def tiny(framework, **kw):
    """As train_pretrain.build_model: the backbone (classifier at the heads' width), then the
    framework; kw: head settings (T, predictor, head_bn) or backbone ones."""
    heads = {k: kw.pop(k) for k in ("T", "predictor", "head_bn") if k in kw}
    backbone = moco.ARCHS["vit_tiny"](num_classes=32, **{**VIT_TINY, **kw})
    return FRAMEWORKS[framework](backbone, dim=16, mlp_dim=32, **heads)


def crops(n, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a, b):
    """Largest |a - b| over tensors, each relative to the reference tensor's largest entry
    (floored at 0.1)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(0.1)).item() for k in a)


def unit(v):
    return v / math.sqrt(sum(x * x for x in v))


# --------------------------------------------------------------------------- SimCLR's loss, by hand
def hand_nt_xent(z1, z2, T):
    """2 tau * (loss_1 + loss_2) with plain loops in float64: anchor a of the 2N views,
    positive its other view, the other 2N - 2 views negatives; loss_v = the mean over the N
    anchors of view v."""
    u = [unit(v) for v in np.concatenate([z1.double().numpy(), z2.double().numpy()])]
    N = len(z1)
    total = 0.0
    for a in range(2 * N):
        pos = (a + N) % (2 * N)
        logits = {j: float(u[a] @ u[j]) / T for j in range(2 * N) if j != a}
        total += -logits[pos] + math.log(sum(math.exp(s) for s in logits.values()))
    return 2 * T * total / N


@pytest.mark.parametrize("T", [0.1, 1.0])
def test_nt_xent_equals_hand_computation(T):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g) * 3
    assert (abs(sb.nt_xent(z1, z2, T).item() - hand_nt_xent(z1, z2, T))
            <= 1e-5 * hand_nt_xent(z1, z2, T))
    # 2 tau * the official loss_a + loss_b (each a mean cross-entropy over N anchors,
    # logits over 2N - 1 views)
    u1, u2 = nn.functional.normalize(z1, dim=1), nn.functional.normalize(z2, dim=1)
    eye = torch.eye(5, dtype=torch.bool)
    loss_a = nn.functional.cross_entropy(
        torch.cat([u1 @ u2.T, (u1 @ u1.T).masked_fill(eye, -1e9)], 1) / T, torch.arange(5))
    loss_b = nn.functional.cross_entropy(
        torch.cat([u2 @ u1.T, (u2 @ u2.T).masked_fill(eye, -1e9)], 1) / T, torch.arange(5))
    assert abs(sb.nt_xent(z1, z2, T).item() - 2 * T * (loss_a + loss_b).item()) <= 1e-5


@pytest.mark.parametrize("T", [0.1, 1.0])
def test_nt_xent_gradient_equals_hand_computation(T):
    """Each view gets gradient twice: as an anchor, (1/tau)(sum_j p_aj u_j - u_pos),
    and as the positive or a negative of every other anchor a, (1/tau)(p_aj - y_aj) u_a;
    times 2 tau / N, then through the normalisation."""
    g = torch.Generator().manual_seed(0)
    N, C = 4, 6
    z1 = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    sb.nt_xent(z1, z2, T).backward()
    z = torch.cat([z1, z2]).detach().numpy()
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    g_u = np.zeros_like(u)
    for a in range(2 * N):
        pos = (a + N) % (2 * N)
        others = [j for j in range(2 * N) if j != a]
        e = np.exp([u[a] @ u[j] / T for j in others])
        p = dict(zip(others, e / e.sum()))
        g_u[a] += (sum(p[j] * u[j] for j in others) - u[pos]) / T  # as the anchor
        for j in others:  # as the positive (y = 1) or a negative (y = 0) of anchor a
            g_u[j] += (p[j] - (j == pos)) * u[a] / T
    g_u *= 2 * T / N
    expected = np.stack([(np.eye(C) - np.outer(u[i], u[i])) @ g_u[i] / np.linalg.norm(z[i])
                         for i in range(2 * N)])
    assert np.abs(torch.cat([z1.grad, z2.grad]).numpy() - expected).max() < 1e-10


# ----------------------------------------------------------------------------- BYOL's loss, by hand
def test_byol_loss_and_gradient_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    N, C = 5, 6
    q = torch.randn(N, C, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    loss = sb.BYOL.loss(q, k)
    qs, ks = q.detach().numpy(), k.numpy()
    # |q^ - k^|^2
    hand = sum(sum((x - y) ** 2 for x, y in zip(unit(qs[i]), unit(ks[i]))) for i in range(N)) / N
    assert abs(loss.item() - hand) < 1e-12
    loss.backward()  # d/dq_i of (1/N) (2 - 2 q^_i . k^_i) = -(2/N) (I - q^ q^T) k^_i / |q_i|
    expected = [-2.0 / N * (np.eye(C) - np.outer(unit(qs[i]), unit(qs[i]))) @ unit(ks[i])
                / np.linalg.norm(qs[i])
                for i in range(N)]
    assert np.abs(q.grad.numpy() - np.stack(expected)).max() < 1e-12


# ----------------------------------------------------------------------------- the models
def test_byol_is_moco_with_byols_loss():
    """Same seed -> the same weights as moco.build_moco with BYOL's heads; forward = MoCo's
    with BYOL's loss."""
    torch.manual_seed(0)
    byol = tiny("byol")
    torch.manual_seed(0)
    ref = moco.build_moco("vit_tiny", dim=16, mlp_dim=32, head_bn="hidden", **VIT_TINY)
    assert list(byol.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b)
               for a, b in zip(byol.state_dict().values(), ref.state_dict().values()))
    bns = [sum(isinstance(m, nn.BatchNorm1d) for m in mod.modules())
           for mod in (byol.base_encoder.head, byol.predictor)]
    # BN in the hidden layers only
    assert bns == [2, 1] and isinstance(byol.predictor[-1], nn.Linear)
    with torch.no_grad():  # make the two encoders differ
        for p in byol.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = crops(8)
    plain = copy.deepcopy(byol)
    loss = byol(x1, x2, 0.9)
    plain.update_momentum_encoder(0.9)
    q1, q2 = (plain.predictor(plain.base_encoder(x)) for x in (x1, x2))
    with torch.no_grad():
        k1, k2 = plain.momentum_encoder(x1), plain.momentum_encoder(x2)
    cos = nn.functional.cosine_similarity
    assert abs(loss.item()
               - ((2 - 2 * cos(q1, k2)).mean() + (2 - 2 * cos(q2, k1)).mean()).item()) <= 1e-6
    # even if someone turns gradients on, the targets carry none
    for p in byol.momentum_encoder.parameters():
        p.requires_grad = True
    loss.backward()
    assert all(p.grad is None for p in byol.momentum_encoder.parameters())
    trained = [p for p in list(byol.base_encoder.parameters()) + list(byol.predictor.parameters())
               if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_simclr_layout_loss_and_gradients_through_both_views():
    torch.manual_seed(0)
    simclr = tiny("simclr", T=0.2)
    torch.manual_seed(0)
    ref = moco.build_moco("vit_tiny", dim=16, mlp_dim=32, predictor=False, **VIT_TINY)
    # no momentum encoder, no predictor: exactly MoCo's query encoder, key for key and
    # weight for weight
    assert list(simclr.state_dict()) == [k for k in ref.state_dict()
                                         if k.startswith("base_encoder.")]
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in simclr.state_dict().items())
    x1, x2 = crops(8)
    x1.requires_grad_(), x2.requires_grad_()
    loss = simclr(x1, x2, 0.99)
    z1, z2 = copy.deepcopy(simclr.base_encoder)(x1), copy.deepcopy(simclr.base_encoder)(x2)
    assert abs(loss.item() - sb.nt_xent(z1, z2, 0.2).item()) <= 1e-6
    # symmetric; m is ignored
    assert abs(loss.item() - copy.deepcopy(simclr)(x2, x1, None).item()) <= 1e-6
    loss.backward()
    # both views are trained, neither is a target
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in simclr.parameters() if p.requires_grad)


def test_frozen_patch_projection_in_all_three():
    x1, x2 = crops(4)
    for framework in FRAMEWORKS:
        model = tiny(framework, stop_grad_conv1=True)
        model(x1, x2, 0.99).backward()
        proj = model.base_encoder.patch_embed.proj
        assert proj.weight.grad is None and proj.bias.grad is None, framework
        assert model.base_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, framework


def test_framework_defaults_and_errors():
    torch.manual_seed(0)
    m = tiny("mocov3")
    torch.manual_seed(0)
    ref = moco.build_moco("vit_tiny", dim=16, mlp_dim=32, **VIT_TINY)
    assert type(m) is moco.MoCo and m.T == ref.T == 1.0
    assert all(torch.equal(a, b)
               for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert tiny("simclr").T == 0.1
    # head_bn='all'
    assert sum(isinstance(x, nn.BatchNorm1d) for x in tiny("simclr").modules()) == 3
    assert isinstance(tiny("byol", predictor=False).predictor, nn.Identity)
    # BYOL's heads: BN in the hidden layers only (2 of the projector, 1 of the predictor)
    assert sum(isinstance(x, nn.BatchNorm1d) for x in tiny("byol").base_encoder.modules()) == 2
    with pytest.raises(ValueError, match="head_bn"):
        tiny("simclr", head_bn="last")


def test_load_backbone_reads_simclr_and_byol(tmp_path):
    x = torch.randn(3, 3, 16, 16)
    for framework in ("simclr", "byol"):
        torch.manual_seed(0)
        model = tiny(framework, stop_grad_conv1=True)
        model(*crops(4), 0.99).backward()
        with torch.no_grad():  # not the initial weights
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
        path = tmp_path / f"{framework}.pth"
        torch.save({"state_dict": model.state_dict(), "arch": "vit_tiny",
                    "backbone_kwargs": {**VIT_TINY, "stop_grad_conv1": True}}, path)
        bb = checkpoint.load_backbone(path).eval()
        assert isinstance(bb.head, nn.Identity)
        assert torch.equal(bb(x), model.base_encoder.eval().forward_features(x)), framework


# ----------------------------------------------------------------------------- 2 processes vs 1
# eval mode: BN uses running statistics, so splitting the batch over processes changes no number
CONFIGS = {
    "simclr_eval": ("simclr", {}, False),
    # no BN at all: train mode is exact
    "simclr_train_bn_free_heads": ("simclr", {"head_bn": "none"}, True),
    "byol_eval": ("byol", {}, False),
}


def ddp_worker(out_dir):
    """Each rank: its half of the batch under DDP, SimCLR's embeddings all-gathered with their
    gradients, against the whole batch in one process."""
    torch.set_num_threads(1)
    N, m, results, runs = 3, 0.99, {}, {}
    # the 1-process references, before any process group
    for name, (framework, kw, train) in CONFIGS.items():
        torch.manual_seed(0)
        model = tiny(framework, T=0.2, **kw).train(train)
        x1, x2 = crops(2 * N)
        ref = copy.deepcopy(model)
        loss_ref = ref(x1, x2, m)
        loss_ref.backward()
        runs[name] = (model, x1, x2, loss_ref.item(), grads(ref))

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for name, (model, x1, x2, loss_ref, grads_ref) in runs.items():
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * N, (rank + 1) * N)
        loss = ddp(x1[part], x2[part], m)
        loss.backward()  # DDP averages the gradients over the 2 ranks
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        results[name] = dict(loss=loss.item(), mean_loss=mean_loss.item() / 2, loss_ref=loss_ref,
                             grad_diff=max_rel_diff(grads(model), grads_ref))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_two_processes_gloo_equal_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        for name, r in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            # the 1-process loss (all 4N anchors against all 4N views) is the mean of the 2 ranks'
            # losses (each: its 2N anchors against the 4N gathered views) ...
            assert (abs(r["mean_loss"] - r["loss_ref"])
                    <= 1e-6 * max(1.0, r["loss_ref"])), (rank, name, r)
            # ... and, as the gather's backward returns every rank's gradient to the embeddings'
            # owner, DDP's average of the ranks' gradients is the gradient of the 1-process loss
            assert r["grad_diff"] <= 1e-5, (rank, name, r)
            assert abs(r["loss"] - r["loss_ref"]) > 1e-4  # a rank's own loss is not the global one


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


def test_simclr_and_byol_losses_are_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(6, 16, generator=g).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        simclr, byol = sb.nt_xent(z1, z2, 0.1), sb.BYOL.loss(z1, z2)
    assert simclr.dtype == byol.dtype == torch.float32
    assert torch.equal(simclr, sb.nt_xent(z1.float(), z2.float(), 0.1))
    assert torch.equal(byol, sb.BYOL.loss(z1.float(), z2.float()))

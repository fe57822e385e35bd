"""moco.py: the loss by hand, the official builder's forward, the momentum update, the key layout,
checkpoint loading, and 2 processes (gloo) against 1. Run as a script under torch.distributed.run it
is the DDP worker."""
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import moco  # noqa: E402
import resnet  # noqa: E402
import vit  # noqa: E402

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP threads spin badly on a shared
    2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VIT_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def tiny_vit_moco(**kw):
    return moco.build_moco("vit_tiny", dim=16, mlp_dim=32, T=0.2, **VIT_TINY, **kw)


def tiny_resnet_moco(**kw):
    return moco.build_moco("resnet18", dim=16, mlp_dim=32, T=0.2, small_stem=True, **kw)


def crops(n, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a, b):
    """Largest |a - b| over tensors, each relative to the reference tensor's largest entry,
    floored at 0.1 (gradients here are ~0.1-300; some are 0 up to rounding, e.g. the ViT's last
    LayerNorm bias, whose shift BN removes)."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(0.1)).item() for k in a)


def official_forward(model, x1, x2, m):
    """The official builder's forward, written out: queries, per-tensor momentum update,
    keys per crop."""
    T = model.T

    def ctr(q, k):
        q, k = nn.functional.normalize(q, dim=1), nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / T
        return nn.CrossEntropyLoss()(logits, torch.arange(logits.shape[0])) * (2 * T)

    q1, q2 = model.predictor(model.base_encoder(x1)), model.predictor(model.base_encoder(x2))
    with torch.no_grad():
        for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
            pm.data = pm.data * m + pb.data * (1.0 - m)
        k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)
    return ctr(q1, k2) + ctr(q2, k1)


# ----------------------------------------------------------------------------- the loss, by hand
def hand_ctr(q, k, T):
    """2 tau * mean_i [-log softmax_j(q^_i . k^_j / tau)[i]] with plain loops in float64."""
    q, k = q.double().numpy(), k.double().numpy()
    total = 0.0
    for i in range(len(q)):
        qi = q[i] / math.sqrt(sum(v * v for v in q[i]))
        logits = [float(qi @ (kj / math.sqrt(sum(v * v for v in kj)))) / T for kj in k]
        total += -logits[i] + math.log(sum(math.exp(z) for z in logits))
    return 2 * T * total / len(q)


@pytest.mark.parametrize("T", [0.2, 1.0])
def test_contrastive_loss_equals_hand_computation(T):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g) * 3
    assert (abs(moco.contrastive_loss(q, k, T).item() - hand_ctr(q, k, T))
            <= 1e-5 * hand_ctr(q, k, T))


@pytest.mark.parametrize("T", [0.1, 1.0, 1e4])
def test_2tau_scaling_makes_the_gradient_free_of_1_over_tau(T):
    """d(2 tau CE)/d q^ = (2/N) sum_j (p_ij - y_ij) k^_j: no 1/tau.
    Large tau: (2/N)(mean_j k^_j - k^_i)."""
    g = torch.Generator().manual_seed(0)
    N = 5
    q = torch.randn(N, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(N, 8, generator=g, dtype=torch.float64)
    moco.contrastive_loss(q, k, T).backward()
    qn, kn = q.detach() / q.detach().norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    p = torch.softmax(qn @ kn.T / T, dim=1).numpy()
    g_hat = np.zeros((N, 8))
    for i in range(N):
        for j in range(N):
            g_hat[i] += 2.0 / N * (p[i, j] - (i == j)) * kn[j].numpy()
    if T == 1e4:  # the large-tau limit: BYOL's -2 k^+ plus a push from the mean key
        limit = 2.0 / N * (kn.mean(0, keepdim=True) - kn).numpy()
        assert np.abs(g_hat - limit).max() < 1e-3
    # through the L2 normalisation: d q^ / d q = (I - q^ q^T) / |q|
    expected = [(np.eye(8) - np.outer(qn[i], qn[i])) @ g_hat[i] / q[i].norm().item()
                for i in range(N)]
    assert np.abs(q.grad.numpy() - np.stack(expected)).max() < 1e-10


# ----------------------------------------------------------------------------- the model's forward
@pytest.mark.parametrize("make", [tiny_vit_moco, tiny_resnet_moco], ids=["vit", "resnet"])
def test_forward_equals_official_builder(make):
    """Our forward (crop by crop; loop update) against the official
    order of work."""
    torch.manual_seed(0)
    ours = make()
    ref = copy.deepcopy(ours)
    x1, x2 = crops(8 if make is tiny_vit_moco else 4)
    # two steps: at the second the momentum encoder differs from the query encoder
    for m in (0.99, 0.9):
        loss, loss_ref = ours(x1, x2, m), official_forward(ref, x1, x2, m)
        loss.backward(), loss_ref.backward()
        assert abs(loss.item() - loss_ref.item()) <= 1e-6 * loss_ref.item()
        assert max_rel_diff(grads(ours), grads(ref)) <= 1e-5
        for a, b in zip(ours.momentum_encoder.parameters(), ref.momentum_encoder.parameters()):
            assert torch.equal(a, b)  # the same arithmetic, bit for bit
        # per-crop BN statistics, as official
        for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name
        # the same "optimizer step" on both: equal query weights, unequal to the keys'
        with torch.no_grad():
            for a, b in zip(ours.parameters(), ref.parameters()):
                if a.grad is not None:
                    b.copy_(a.sub_(0.5 * b.grad))
                    a.grad = b.grad = None


def test_loss_is_symmetric_in_the_two_crops():
    torch.manual_seed(0)
    a = tiny_vit_moco()
    b = copy.deepcopy(a)
    x1, x2 = crops(8)
    assert abs(a(x1, x2, 0.99).item() - b(x2, x1, 0.99).item()) <= 1e-6


def test_gradients_reach_the_query_side_only():
    torch.manual_seed(0)
    model = tiny_vit_moco()
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    # even if someone turns gradients on, the keys carry none
    for p in model.momentum_encoder.parameters():
        p.requires_grad = True
    x1, x2 = crops(8)
    model(x1, x2, 0.99).backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    trained = [p for p in list(model.base_encoder.parameters()) + list(model.predictor.parameters())
               if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


# ----------------------------------------------------------------------------- momentum update
def test_momentum_update():
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    with torch.no_grad():  # make the two encoders differ
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))
    buffers = [b.clone() for b in model.momentum_encoder.buffers()]
    k0 = [p.clone() for p in model.momentum_encoder.parameters()]
    q = list(model.base_encoder.parameters())

    model.update_momentum_encoder(1.0)  # m = 1: frozen
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.parameters(), k0))
    model.update_momentum_encoder(0.99)  # hand value, and the official expression bit for bit
    for a, k, p in zip(model.momentum_encoder.parameters(), k0, q):
        assert torch.equal(a, k * 0.99 + p * (1.0 - 0.99))
        hand = 0.99 * k.double().numpy() + 0.01 * p.detach().double().numpy()
        assert np.abs(a.double().numpy() - hand).max() <= 1e-6 * max(1.0, np.abs(hand).max())
    model.update_momentum_encoder(0.0)  # m = 0: a copy of the query encoder
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.parameters(), q))
    # parameters only: the momentum encoder's BN running statistics are untouched,
    # as in the official code
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_encoder.buffers(), buffers))


def test_m0_keys_come_from_the_query_encoder():
    """m = 0, the SimCLR-like ablation: keys computed by the (just copied) query weights."""
    torch.manual_seed(0)
    model = tiny_vit_moco()
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x1, x2 = crops(8)
    ref = copy.deepcopy(model)
    loss = model(x1, x2, 0.0)
    q1, q2 = (ref.predictor(ref.base_encoder(x)) for x in (x1, x2))
    with torch.no_grad():
        k1, k2 = ref.base_encoder(x1), ref.base_encoder(x2)
    expected = moco.contrastive_loss(q1, k2, ref.T) + moco.contrastive_loss(q2, k1, ref.T)
    assert abs(loss.item() - expected.item()) <= 1e-6


# -------------------------------------------------------------------------- layout and construction
def test_key_layout_vit_and_official_state_dict_loads():
    torch.manual_seed(0)
    model = moco.build_moco("vit_tiny", dim=16, mlp_dim=48, **VIT_TINY)
    sd = model.state_dict()
    for enc in ("base_encoder", "momentum_encoder"):
        heads = {k[len(enc) + 1:]: tuple(v.shape) for k, v in sd.items()
                 if k.startswith(enc + ".head.")}
        assert heads == {
            "head.0.weight": (48, 32), "head.3.weight": (48, 48), "head.6.weight": (16, 48),
            **{f"head.{i}.{n}": (48,) for i in (1, 4)
               for n in ("weight", "bias", "running_mean", "running_var")},
            "head.1.num_batches_tracked": (), "head.4.num_batches_tracked": (),
            # the last BN has no affine parameters: running statistics only
            "head.7.running_mean": (16,), "head.7.running_var": (16,),
            "head.7.num_batches_tracked": ()}
    pred = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("predictor.")}
    assert pred == {"predictor.0.weight": (48, 16), "predictor.3.weight": (16, 48),
                    **{f"predictor.1.{n}": (48,)
                       for n in ("weight", "bias", "running_mean", "running_var")},
                    "predictor.1.num_batches_tracked": (), "predictor.4.running_mean": (16,),
                    "predictor.4.running_var": (16,), "predictor.4.num_batches_tracked": ()}
    assert {k.split(".")[0] for k in sd} == {"base_encoder", "momentum_encoder", "predictor"}
    assert "base_encoder.cls_token" in sd and "base_encoder.patch_embed.proj.weight" in sd
    # an official-layout checkpoint (DDP's 'module.' prefix), made here by renaming ours,
    # loads strictly
    official = {"module." + k: v.clone() + 0.01 for k, v in sd.items() if v.is_floating_point()}
    official.update({"module." + k: v for k, v in sd.items() if not v.is_floating_point()})
    fresh = moco.build_moco("vit_tiny", dim=16, mlp_dim=48, **VIT_TINY)
    fresh.load_state_dict(checkpoint.strip_prefix(official), strict=True)
    assert torch.equal(fresh.state_dict()["predictor.3.weight"],
                       official["module.predictor.3.weight"])


def test_key_layout_resnet_and_official_construction():
    torch.manual_seed(0)
    model = tiny_resnet_moco()
    sd = model.state_dict()
    fc = {k[len("base_encoder."):]: tuple(v.shape) for k, v in sd.items()
          if k.startswith("base_encoder.fc.")}
    assert fc == {"fc.0.weight": (32, 512), "fc.3.weight": (16, 32),
                  **{f"fc.1.{n}": (32,) for n in ("weight", "bias", "running_mean", "running_var")},
                  "fc.1.num_batches_tracked": (), "fc.4.running_mean": (16,),
                  "fc.4.running_var": (16,), "fc.4.num_batches_tracked": ()}
    pred = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("predictor.")}
    assert pred == {"predictor.0.weight": (32, 16), "predictor.3.weight": (16, 32),  # no last BN
                    **{f"predictor.1.{n}": (32,)
                       for n in ("weight", "bias", "running_mean", "running_var")},
                    "predictor.1.num_batches_tracked": ()}
    assert all(isinstance(m, nn.Linear) and m.bias is None
               for m in list(model.base_encoder.fc) + list(model.predictor)
               if isinstance(m, nn.Linear))
    # the official code builds its ResNet with zero_init_residual=True; the encoders start equal
    assert all(b.bn2.weight.abs().sum() == 0
               for layer in (model.base_encoder.layer1, model.base_encoder.layer4)
               for b in layer)
    for a, b in zip(model.base_encoder.state_dict().values(),
                    model.momentum_encoder.state_dict().values()):
        assert torch.equal(a, b)


def test_ablation_switches():
    torch.manual_seed(0)

    def n_bn(module):
        return sum(isinstance(m, nn.BatchNorm1d) for m in module.modules())

    full, hidden, none = (tiny_vit_moco(head_bn=b) for b in ("all", "hidden", "none"))
    assert (n_bn(full.base_encoder.head), n_bn(full.predictor)) == (3, 2)
    assert (n_bn(hidden.base_encoder.head), n_bn(hidden.predictor)) == (2, 1)
    assert (isinstance(hidden.base_encoder.head[-1], nn.Linear)
            and isinstance(hidden.predictor[-1], nn.Linear))
    assert (n_bn(none.base_encoder.head), n_bn(none.predictor)) == (0, 0)
    assert [type(m) for m in none.predictor] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match="head_bn"):
        tiny_vit_moco(head_bn="some")

    no_pred = tiny_vit_moco(predictor=False)
    assert not any(k.startswith("predictor.") for k in no_pred.state_dict())
    x1, x2 = crops(8)
    ref = copy.deepcopy(no_pred)
    loss = no_pred(x1, x2, 0.99)
    ref.predictor = nn.Identity()
    # queries = projector outputs
    assert abs(loss.item() - official_forward(ref, x1, x2, 0.99).item()) <= 1e-6


def test_archs_and_sync_batchnorm_conversion():
    assert set(moco.ARCHS) == set(vit.ARCHS) | set(resnet.ARCHS)
    # conversion only: SyncBN runs under CUDA DDP
    model = moco.convert_sync_batchnorm(tiny_resnet_moco())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.predictor.modules()) == 1
    assert list(model.state_dict()) == list(tiny_resnet_moco().state_dict())


# ----------------------------------------------------------------------------- load_backbone
def test_load_backbone_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    model = tiny_vit_moco(stop_grad_conv1=True)
    model(*crops(4), 0.99)  # not the initial weights
    path = tmp_path / "ours.pth"
    torch.save({"state_dict": model.state_dict(), "arch": "vit_tiny", "epoch": 1,
                "backbone_kwargs": {**VIT_TINY, "stop_grad_conv1": True}}, path)
    bb = checkpoint.load_backbone(path).eval()
    # not frozen any more
    assert isinstance(bb.head, nn.Identity) and bb.patch_embed.proj.weight.requires_grad
    assert torch.equal(bb(x), model.base_encoder.eval().forward_features(x))

    # the official layout: 'module.' prefix, arch recorded, no backbone settings
    # (passed here instead)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "arch": "vit_tiny", "epoch": 1}, path)
    assert torch.equal(checkpoint.load_backbone(path, **VIT_TINY).eval()(x), bb(x))

    # a ResNet, and a plain classifier state dict (torchvision-style file, with its fc)
    r = tiny_resnet_moco()
    r(*crops(4), 0.99)
    torch.save({"state_dict": r.state_dict(), "arch": "resnet18",
                "backbone_kwargs": {"small_stem": True}}, path)
    feats = r.base_encoder.eval().forward_features(x)
    assert torch.equal(checkpoint.load_backbone(path).eval()(x), feats)
    plain = resnet.resnet18(small_stem=True, num_classes=10)
    plain.load_state_dict({**checkpoint.load_backbone(path).state_dict(),
                           "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    torch.save(plain.state_dict(), path)
    assert torch.equal(checkpoint.load_backbone(path, "resnet18", small_stem=True).eval()(x), feats)


def test_load_backbone_bad_files(tmp_path):
    def error(path, *args, **kwargs):
        with pytest.raises(ValueError) as e:
            checkpoint.load_backbone(path, *args, **kwargs)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        return str(e.value)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert "not a readable checkpoint" in error(text)
    assert "not a readable checkpoint" in error(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "arch": "resnet18"}, junk)
    assert "holds no weights" in error(junk)
    torch.manual_seed(0)
    model = tiny_vit_moco()
    ckpt = tmp_path / "vit.pth"
    torch.save({"state_dict": model.state_dict(), "arch": "vit_tiny",
                "backbone_kwargs": VIT_TINY}, ckpt)
    assert "holds arch 'vit_tiny'" in error(ckpt, "vit_small")
    assert "of another shape" in error(ckpt, embed_dim=64)  # other settings than the checkpoint's
    bare = tmp_path / "bare.pth"
    torch.save(model.base_encoder.state_dict(), bare)
    assert "does not record its arch" in error(bare)
    assert "missing" in error(bare, "resnet18")  # ViT weights offered as a ResNet


def test_load_backbone_without_class_token_and_final_norm(tmp_path):
    """The keys follow the backbone settings the checkpoint records: no cls_token,
    L position rows, no norm.*."""
    torch.manual_seed(0)
    kw = {**VIT_TINY, "class_token": False, "pool": "avg", "final_norm": False}
    model = tiny_vit_moco(class_token=False, pool="avg", final_norm=False)
    model(*crops(4), 0.99)
    sd = model.state_dict()
    assert not any(k.endswith(("cls_token", ".norm.weight", ".norm.bias")) for k in sd)
    assert sd["base_encoder.pos_embed"].shape == (1, 16, 32)  # 4 x 4 patches, no class-token row
    path = tmp_path / "no_cls.pth"
    torch.save({"state_dict": sd, "arch": "vit_tiny", "backbone_kwargs": kw}, path)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(checkpoint.load_backbone(path).eval()(x),
                       model.base_encoder.eval().forward_features(x))
    # other settings than the checkpoint's
    with pytest.raises(ValueError, match="missing.*cls_token"):
        checkpoint.load_backbone(path, class_token=True)


# ----------------------------------------------------------------------------- 2 processes vs 1
# eval mode: BN uses running statistics, so splitting the batch over processes changes no number
CONFIGS = {
    "vit_eval": (tiny_vit_moco, {}, False),
    "resnet_eval": (tiny_resnet_moco, {}, False),
    # no BN at all: train mode is exact
    "vit_train_bn_free_heads": (tiny_vit_moco, {"head_bn": "none"}, True),
}


def ddp_worker(out_dir):
    """Each rank: its half of the batch under DDP (keys all-gathered), against the whole batch
    in one process."""
    torch.set_num_threads(1)
    N, m, results, runs = 2, 0.99, {}, {}
    # the 1-process references, before any process group
    for name, (make, kw, train) in CONFIGS.items():
        torch.manual_seed(0)
        model = make(**kw).train(train)
        x1, x2 = crops(2 * N)
        ref = copy.deepcopy(model)
        loss_ref = ref(x1, x2, m)
        loss_ref.backward()
        # per-row losses of the whole batch, from the reference's own queries and keys
        # (plain formula)
        plain = copy.deepcopy(model)
        plain.update_momentum_encoder(m)
        with torch.no_grad():
            q1, q2 = (plain.predictor(plain.base_encoder(x)) for x in (x1, x2))
            k1, k2 = plain.momentum_encoder(x1), plain.momentum_encoder(x2)
        rows = sum(nn.functional.cross_entropy(
            nn.functional.normalize(q, dim=1) @ nn.functional.normalize(k, dim=1).T / plain.T,
            torch.arange(2 * N), reduction="none") * 2 * plain.T for q, k in ((q1, k2), (q2, k1)))
        runs[name] = (model, x1, x2, loss_ref.item(), rows, grads(ref))

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for name, (model, x1, x2, loss_ref, rows, grads_ref) in runs.items():
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        part = slice(rank * N, (rank + 1) * N)
        loss = ddp(x1[part], x2[part], m)
        loss.backward()  # DDP averages the gradients over the 2 ranks
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        results[name] = dict(loss=loss.item(), rank_rows=rows[part].mean().item(),
                             mean_loss=mean_loss.item() / 2,
                             loss_ref=loss_ref, rows_mean=rows.mean().item(),
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
            # this rank's loss = the 1-process per-sample losses of its half of the batch, averaged
            assert abs(r["loss"] - r["rank_rows"]) <= 1e-6, (rank, name, r)
            # the 1-process loss is the mean over all 2N samples = the mean of the 2 ranks' losses
            assert (abs(r["mean_loss"] - r["loss_ref"]) <= 1e-6
                    and abs(r["rows_mean"] - r["loss_ref"]) <= 1e-6)
            # so DDP's gradient average (L_0 + L_1)/2 differentiates exactly the
            # 1-process loss: factor 1
            assert r["grad_diff"] <= 1e-5, (rank, name, r)


if __name__ == "__main__":
    ddp_worker(sys.argv[1])


def test_loss_is_computed_in_fp32_under_autocast():
    """Under bf16 autocast the heads' outputs arrive in bf16; the logits q.k/tau must still be
    fp32 (a bf16 logit at 1/tau = 5 is quantised to ~0.02): the loss equals the fp32 loss of the
    same (bf16-valued) embeddings, bit for bit, and its gradient flows back in the input's dtype."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(8, 16, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = moco.contrastive_loss(q, k, 0.2)
    reference = moco.contrastive_loss(q.detach().float(), k.float(), 0.2)
    assert loss.dtype == torch.float32 and torch.equal(loss, reference)
    loss.backward()
    assert q.grad.dtype == torch.bfloat16
    # what the guard prevents: the same logits computed by autocast's bf16 matmul differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qn, kn = F.normalize(q.detach().float(), dim=1), F.normalize(k.float(), dim=1)
        coarse = F.cross_entropy(qn @ kn.T / 0.2, torch.arange(8)) * 0.4
    assert coarse.item() != reference.item()

"""The porting kit: golden/mocov3_vit_tiny.npz (written by tools/make_golden.py) equals what the
code computes now, holds every key a port needs, is sharp enough to catch a port's typical mistakes,
and the numpy example of PORTING.md runs against it with numpy only."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # tools/ is a folder of scripts, not a package
import make_golden  # noqa: E402
import moco  # noqa: E402

# Tolerances, two kinds.
# (1) Values that pass through the network (forward values, grad/, buffer/): max |computed - stored|
#     at most 1e-4 of the tensor's scale, max(max |stored|, 0.1). fp32 results depend on the
#     summation order (CPU kind, thread count, torch version, a port's kernels). Measured:
#     a float64 run differs from the fp32 file by at most 1.0e-5 of that scale
#     (1 vs 2 threads: 6e-6), mostly in the heads, whose BN divides by the spread of 8 samples and
#     so amplifies rounding. Two fp32 implementations may then differ by ~2e-5: 1e-4 leaves 5x.
#     The floor 0.1 is for gradients that are 0 up to rounding (base_encoder.norm.bias:
#     the BN after the projector's bias-free first Linear removes any shift of the features),
#     whose stored value is noise (~1e-7).
# (2) Elementwise arithmetic (momentum/, adamw/, lars/ recomputed from the file's own param/ and
#     grad/; the seeded init): rtol 1e-6, atol 1e-7, ~10 fp32 ulps for values up to 1.
#     Fused or reordered arithmetic moves a result by an ulp or two; the smallest effect checked,
#     AdamW's weight decay, moves a weight by lr * wd * |p| = 1.5e-5 |p|, 100+ ulps.
NET_TOL, NET_FLOOR = 1e-4, 0.1
RTOL, ATOL = 1e-6, 1e-7
ELEMENTWISE = ("param", "momentum", "adamw", "lars")
FORWARD = ("base_h1", "base_h2", "momentum_h1", "momentum_h2", "base_z1", "base_z2",
           "q1", "q2", "k1", "k2", "ctr_q1_k2", "ctr_q2_k1", "loss")


def mismatches(computed, stored):
    """Keys of computed whose arrays differ from stored's beyond the tolerances above."""
    bad = []
    for k, a in computed.items():
        e = stored[k]
        if a.shape != e.shape:
            bad.append(k)
        elif k.split("/")[0] in ELEMENTWISE or k in ("x1", "x2"):
            if not np.allclose(a, e, rtol=RTOL, atol=ATOL):
                bad.append(k)
        elif np.abs(a - e).max() > NET_TOL * max(np.abs(e).max(), NET_FLOOR):
            bad.append(k)
    return bad


def group(stored, prefix):
    """{key: tensor} of the arrays named prefix/key."""
    n = len(prefix) + 1
    return {k[n:]: torch.from_numpy(v) for k, v in stored.items() if k.startswith(prefix + "/")}


def recompute(stored, config=make_golden.CONFIG):
    """Every array again from the file's own inputs: forward, grad/, momentum/, buffer/ from its
    param/, x1, x2; adamw/ and lars/ from its param/ and grad/, so gradient rounding stays out
    of that check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: fastest on one thread, and kind to a shared machine
    try:
        params = group(stored, "param")
        x1, x2 = torch.from_numpy(stored["x1"]), torch.from_numpy(stored["x2"])
        out = make_golden.compute_golden(params, x1, x2, config)
        steps = make_golden.optimizer_steps(params, group(stored, "grad"), config)
    finally:
        torch.set_num_threads(threads)
    out.update({k: v.detach().numpy() for k, v in steps.items()})
    del out["config"]
    return out


@pytest.fixture(scope="module")
def stored():
    with np.load(make_golden.OUT) as f:
        return dict(f)


def test_file_matches_the_code(stored):
    config = json.loads(str(stored["config"]))
    assert config.pop("torch")  # provenance only: the torch that wrote the file
    assert config == json.loads(json.dumps(make_golden.CONFIG))
    assert mismatches(recompute(stored), stored) == []


def test_seeded_init_reproduces_the_stored_inputs(stored):
    """Guards the init code (vit._init_weights, build_mlp, the sin-cos table) and the generator's
    seeding; the other tests start from the file's own params, so a change of torch's RNG alone
    fails only this."""
    params, x1, x2 = make_golden.initial_state()
    seeded = {f"param/{k}": v.numpy() for k, v in params.items()}
    assert mismatches({"x1": x1.numpy(), "x2": x2.numpy(), **seeded}, stored) == []


def test_keys_are_complete(stored):
    model = make_golden.build(make_golden.CONFIG)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    frozen = {"base_encoder.patch_embed.proj.weight", "base_encoder.patch_embed.proj.bias",
              "base_encoder.pos_embed"}  # the frozen patch projection, the fixed sin-cos table
    assert frozen.isdisjoint(trainable)
    assert not any(k.startswith("momentum_encoder.") for k in trainable)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in group(stored, "param").items()} == shapes
    for prefix in ("grad", "adamw", "lars"):
        assert set(group(stored, prefix)) == trainable, prefix
    momentum_params = {k for k, _ in model.named_parameters() if k.startswith("momentum_encoder.")}
    assert set(group(stored, "momentum")) == momentum_params
    assert set(group(stored, "buffer")) == {k for k, _ in model.named_buffers()}
    assert {k for k in stored if "/" not in k} == {"config", "x1", "x2", *FORWARD}
    for k, v in stored.items():
        if k != "config":
            assert v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32), k
            assert np.isfinite(v).all(), k


# ---- the tolerances are tight enough: typical mistakes of a port are flagged ---------------------
def _halve_loss(monkeypatch):  # ctr without the 2 of 2 tau
    ctr = moco.contrastive_loss
    monkeypatch.setattr(moco, "contrastive_loss", lambda q, k, T: ctr(q, k, T) / 2)


def _swap_momentum(monkeypatch):  # f_k <- (1 - m) f_k + m f_q: the update formula turned around
    update = moco.MoCo.update_momentum_encoder
    monkeypatch.setattr(moco.MoCo, "update_momentum_encoder", lambda self, m: update(self, 1 - m))


C = make_golden.CONFIG
MISTAKES = {  # name: (monkeypatch, config, keys that must then be flagged)
    "loss without 2": (_halve_loss, C, ["loss", "grad/predictor.0.weight"]),
    "momentum swapped": (_swap_momentum, C, ["momentum/momentum_encoder.head.0.weight", "k1"]),
    "adamw no decay": (None, {**C, "adamw": {**C["adamw"], "weight_decay": 0.0}},
                       ["adamw/predictor.0.weight"]),
    "lars adapts 1-d": (None, {**C, "lars": {**C["lars"], "exclude_1d": False}},
                        ["lars/predictor.1.weight"]),
}


@pytest.mark.parametrize("name", MISTAKES)
def test_tolerances_catch_a_wrong_step(stored, monkeypatch, name):
    patch, config, flagged = MISTAKES[name]
    if patch is not None:
        patch(monkeypatch)
    bad = mismatches(recompute(stored, config), stored)
    assert set(flagged) <= set(bad)
    if name.startswith(("adamw", "lars")):  # only the optimizer's own output moves
        assert {k.split("/")[0] for k in bad} == {name.split()[0]}


# ---- PORTING.md's example ------------------------------------------------------------------------
def porting_example():
    """The first ```python block of PORTING.md."""
    with open(os.path.join(ROOT, "PORTING.md")) as f:
        return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


def run_numpy_only(code, cwd):
    """code in a fresh python where `import torch` fails: the example must need numpy only."""
    prelude = "import sys; sys.modules['torch'] = None\n"
    cmd = [sys.executable, "-c", prelude + code]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def test_porting_numpy_example_checks_the_loss(stored, tmp_path):
    code = porting_example()
    done = run_numpy_only(code, ROOT)
    assert done.returncode == 0, done.stderr
    # The same example on a file whose loss lacks the factor 2 tau must fail.
    (tmp_path / "golden").mkdir()
    wrong = {**stored, "loss": stored["loss"] / (2 * make_golden.CONFIG["T"])}
    np.savez(tmp_path / "golden" / os.path.basename(make_golden.OUT), **wrong)
    done = run_numpy_only(code, tmp_path)
    assert done.returncode != 0 and "AssertionError" in done.stderr

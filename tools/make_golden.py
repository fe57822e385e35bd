"""Reference tensors for ports of MoCo v3 (JAX, MLX, TensorFlow, ...): one training step of a
tiny ViT MoCo, written to one .npz that a port loads with numpy and checks itself against,
stage by stage.

    python tools/make_golden.py              # regenerates the committed golden/mocov3_vit_tiny.npz
    python tools/make_golden.py --out F.npz  # writes elsewhere

The step is the one `train_pretrain.py` takes (Algorithm 1, in the official code's order):
momentum update with m, queries from f_q, keys from the updated f_k,
loss = ctr(q1, k2) + ctr(q2, k1), backward, then one optimizer step: AdamW (the ViT recipe) and,
from the same gradients and parameters, LARS (the ResNet recipe, on the same ViT, so that one file
covers both). The file's layout and the conventions a port must match: README.md, section "Porting".
fp32 on the CPU, one thread, seeded: regenerating with the same torch gives the same arrays.
"""
import argparse
import copy
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import moco  # noqa: E402
from lars_lamb import LARS  # noqa: E402

OUT = os.path.join(ROOT, "golden", "mocov3_vit_tiny.npz")
# Batch 8, not 4: the heads' BN divides by the spread of the batch, and over 4 samples it amplifies
# fp32 rounding ~4x more (measured against float64), which would force looser
# tolerances on every port.
BATCH = 8
CONFIG = dict(
    arch="vit_tiny", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
    stop_grad_conv1=True, dim=32, mlp_dim=128, T=0.2, m=0.99, batch=BATCH, seed=0,
    # At construction f_k is a copy of f_q: the momentum update would change nothing, check nothing.
    momentum_encoder_init="base_encoder of a second build_moco under torch.manual_seed(seed + 1)",
    inputs="x1, x2: torch.randn(batch, 3, img_size, img_size), a torch.Generator seeded seed + 2",
    # The recipes of train_pretrain.py (official CONFIG.md), one parameter group holding every
    # parameter, as the official code (those without a gradient, f_k and the frozen patch
    # projection, are skipped). lr is the base lr (the recipe's lr at batch 256), not scaled to this
    # batch: scaled (x 8/256), one AdamW step moves a weight by a few hundred fp32 ulps,
    # its weight decay by a few.
    adamw=dict(lr=1.5e-4, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8),
    lars=dict(lr=0.6, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001, exclude_1d=True),
)


def build(config):
    """The MoCo model of the config, untrained, weights from torch's global RNG."""
    return moco.build_moco(
        config["arch"], dim=config["dim"], mlp_dim=config["mlp_dim"], T=config["T"],
        depth=config["depth"], embed_dim=config["embed_dim"], num_heads=config["num_heads"],
        img_size=config["img_size"], patch_size=config["patch_size"],
        stop_grad_conv1=config["stop_grad_conv1"])


def initial_state(config=CONFIG):
    """The seeded initial state dict (f_k re-initialised, see CONFIG) and the two crops
    (B, 3, H, W)."""
    torch.manual_seed(config["seed"])
    model = build(config)
    torch.manual_seed(config["seed"] + 1)
    other = build(config)
    model.momentum_encoder.load_state_dict(other.base_encoder.state_dict())
    g = torch.Generator().manual_seed(config["seed"] + 2)
    shape = (config["batch"], 3, config["img_size"], config["img_size"])
    x1, x2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return {k: v.clone() for k, v in model.state_dict().items()}, x1, x2


def spelled_out_forward(model, x1, x2, m):
    """MoCo.forward written out with moco.py's own pieces, keeping every intermediate
    (all (B, C))."""
    T = model.T
    model.update_momentum_encoder(m)  # first, before the keys: the keys come from the updated f_k
    out = {}
    with torch.no_grad():
        for name, encoder in (("base", model.base_encoder), ("momentum", model.momentum_encoder)):
            for i, x in ((1, x1), (2, x2)):  # backbone features, crop by crop
                out[f"{name}_h{i}"] = encoder.forward_features(x)  # (B, D)
        z1, z2 = model.base_encoder(x1), model.base_encoder(x2)  # projector outputs, BN per crop
        q1, q2 = model.predictor(z1), model.predictor(z2)  # queries
        k1, k2 = model.momentum_encoder(x1), model.momentum_encoder(x2)  # keys
        ctr1, ctr2 = moco.contrastive_loss(q1, k2, T), moco.contrastive_loss(q2, k1, T)
    out.update(base_z1=z1, base_z2=z2, q1=q1, q2=q2, k1=k1, k2=k2)
    out.update(ctr_q1_k2=ctr1, ctr_q2_k1=ctr2, loss=ctr1 + ctr2)
    return out


def make_optimizer(name, params, config=CONFIG):
    """torch.optim.AdamW or lars_lamb.LARS, settings of config[name], over params (one group)."""
    c = config[name]
    if name == "adamw":
        return torch.optim.AdamW(params, c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                                 weight_decay=c["weight_decay"])
    return LARS(params, c["lr"], weight_decay=c["weight_decay"], momentum=c["momentum"],
                trust_coefficient=c["trust_coefficient"], exclude_1d=c["exclude_1d"])


def optimizer_steps(params, grads, config=CONFIG):
    """{'adamw/<key>', 'lars/<key>': tensor}: the trainable parameters after one step of each
    optimizer, each from the state dict params and the gradients grads ({key: tensor}),
    every parameter in the optimizer (those without a gradient are skipped)."""
    out = {}
    for name in ("adamw", "lars"):
        model = build(config)
        model.load_state_dict(params, strict=True)
        for k, p in model.named_parameters():
            p.grad = grads[k].clone() if k in grads else None
        make_optimizer(name, model.parameters(), config).step()
        out.update({f"{name}/{k}": p for k, p in model.named_parameters() if p.requires_grad})
    return out


def compute_golden(params=None, x1=None, x2=None, config=CONFIG):
    """Every array of the golden file -> {name: numpy array}. params (a MoCo state dict) and
    x1, x2 default to the seeded ones of initial_state; given, they are used as they are
    (strict=True load)."""
    if params is None or x1 is None or x2 is None:
        seeded_params, seeded_x1, seeded_x2 = initial_state(config)
        params = seeded_params if params is None else params
        x1 = seeded_x1 if x1 is None else x1
        x2 = seeded_x2 if x2 is None else x2
    model = build(config)
    model.load_state_dict(params, strict=True)
    model.train()  # BN in the heads normalises with the statistics of the batch, crop by crop
    probe = copy.deepcopy(model)  # the same weights, for the written-out forward

    loss = model(x1, x2, config["m"])  # the training step's forward, as train_pretrain.py calls it
    loss.backward()
    parts = spelled_out_forward(probe, x1, x2, config["m"])
    assert torch.equal(parts["loss"], loss.detach()), "the written-out forward left MoCo.forward"
    for p, p_probe in zip(model.parameters(), probe.parameters()):
        assert torch.equal(p, p_probe)  # the same momentum update

    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    arrays = {
        "config": json.dumps({**config, "torch": torch.__version__}, sort_keys=True),
        "x1": x1, "x2": x2,
        **{f"param/{k}": v for k, v in params.items()},
        **parts,
        **{f"grad/{k}": g for k, g in grads.items()},
        **{f"momentum/{k}": p for k, p in model.named_parameters()
           if k.startswith("momentum_encoder.")},
        # BN running statistics after the step: each head BN has seen two batches, one per crop.
        **{f"buffer/{k}": b for k, b in model.named_buffers()},
        **optimizer_steps(params, grads, config),
    }
    # float32 for every float tensor; BN's num_batches_tracked stays int64, as in the state dict
    return {k: v.detach().numpy() if torch.is_tensor(v) else np.array(v) for k, v in arrays.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT,
                        help="where to write the .npz (default: the committed one)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same summation order on every run
    arrays = compute_golden()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, args.out)  # atomic: a reader never sees half a file
    print(f"wrote {args.out}: {len(arrays)} arrays, {os.path.getsize(args.out) / 2 ** 20:.2f} MiB")


if __name__ == "__main__":
    main()

"""Checkpoints: the one reader of every file the scripts take, the atomic writer, and the bare
backbone of a checkpoint (for linear probing, fine-tuning, kNN and the figures of labs/look.py).

Files read, all with torch.load(weights_only=True), so that loading can never run code:
  * ours: {'state_dict': MoCo / SimCLR / BYOL keys, 'arch', 'backbone_kwargs', 'framework',
    'epoch', 'optimizer', 'args', ...};
  * the official MoCo v3 release: {'state_dict': 'module.base_encoder.*' ..., 'arch', 'epoch',
    'optimizer'}: DDP's 'module.' prefix is stripped, the keys are otherwise ours;
  * plain weights, bare or under 'state_dict' / 'model' (torchvision's ResNet files, DeiT / MAE
    checkpoints, the classifiers of train_linear.py and train_finetune.py).
Anything else (missing, unreadable, no tensors, another arch) raises a one-line UserError.
"""
import os

import torch
import torch.nn as nn

import moco
import vit
from launch import UserError


def strip_prefix(state_dict, prefix="module."):
    """Keys without `prefix` (the DDP wrapper's 'module.' of the official checkpoints);
    other keys unchanged."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def save(obj, path):
    """torch.save to a temporary file next to `path`, then rename: a crash never leaves a
    torn checkpoint."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read(path):
    """The one reader of every checkpoint the scripts take (all with torch.load(weights_only=True))
    -> a dict whose 'state_dict' holds the weights without DDP's 'module.' prefix, beside whatever
    else the file holds:
      * ours: {'state_dict', 'arch', 'backbone_kwargs', 'epoch', 'optimizer', 'args', ...};
      * the official MoCo v3 ones: {'state_dict': 'module.base_encoder.*' ..., 'arch',
        'epoch', 'optimizer'};
      * plain weights, bare or under 'model' (torchvision's ResNet files, DeiT / MAE checkpoints).
    Anything else (missing, unreadable, no tensors) raises a one-line UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is not a readable checkpoint: no such file") from None
    except Exception as e:  # not a torch file, or objects beyond plain data
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a readable checkpoint "
                        f"({type(e).__name__}: {first_line})") from None
    if isinstance(ckpt, dict) and ("state_dict" in ckpt or "model" in ckpt):
        ckpt = dict(ckpt)
        ckpt["state_dict"] = ckpt.pop("state_dict" if "state_dict" in ckpt else "model")
    else:
        ckpt = {"state_dict": ckpt}
    state = ckpt["state_dict"]
    if not (isinstance(state, dict) and state
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{path} holds no weights "
                        "(expected a state dict of tensors, bare or under 'state_dict')")
    ckpt["state_dict"] = strip_prefix(state)
    return ckpt


def load_weights(model, state_dict, path):
    """model.load_state_dict(state_dict) (strict), with a one-line UserError naming `path` if it
    does not fit (other keys or shapes: another arch, settings or number of classes)."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not fit this model ({first_line})") from None


def resume(path, model, optimizer, scaler=None, **expected):
    """A training checkpoint of train_pretrain.py into the model, the optimizer and the GradScaler
    -> the checkpoint (its 'epoch' counts the epochs done, as the official code's). expected:
    entries the file must record with these values (framework, arch)."""
    ckpt = read(path)
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"{path} is not a MoCo v3 training checkpoint (no optimizer state)")
    recorded = {k: ckpt.get(k) for k in expected}
    if recorded != expected:
        raise UserError(f"{path} records {recorded}, not {expected}")
    load_weights(model, ckpt["state_dict"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:  # torch's words for another optimizer's state
        raise UserError(f"the optimizer state of {path} does not fit ({e})") from None
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt


# Settings that shape training, not the weights: not carried from a pretraining checkpoint to the
# loaded backbone.
TRAINING_ONLY = ("num_classes", "zero_init_residual", "stop_grad_conv1", "drop_path_rate",
                  "grad_ckpt")


def load_backbone(path, arch=None, weights=True, **backbone_kwargs):
    """The bare backbone of a checkpoint: classifier = nn.Identity, normalised images
    (B, 3, H, W) -> (B, D).

    Reads (all with torch.load(weights_only=True)):
      * MoCo checkpoints, ours ({'state_dict': MoCo keys, 'arch', 'backbone_kwargs'}) and the
        official ones ({'state_dict': 'module.base_encoder.*' ..., 'arch'}): base_encoder.*
        without the projector;
      * plain backbone weights, bare or under 'state_dict' / 'model', with or without 'module.'
        (torchvision's ResNet files, our or the official linear / fine-tuned classifiers):
        all but the classifier (head.* / fc.*).
    arch: needed when the file records none; must match the one it records. Architecture settings
    come from the file's 'backbone_kwargs' when present, overridden by backbone_kwargs;
    training-only ones (drop_path_rate, stop_grad_conv1, zero_init_residual) are not carried over.
    Loads with strict=True; anything else that goes wrong (unreadable file, no weights,
    other arch, keys or shapes that do not fit) raises a one-line UserError.
    The model is returned in training mode with every parameter trainable; call .eval() to
    extract features.
    weights=False: the architecture the file records, with fresh random weights
    (the random-init baseline).
    """
    ckpt = read(path)
    state = ckpt["state_dict"]
    # a MoCo checkpoint: keep the query backbone
    if any(k.startswith("base_encoder.") for k in state):
        state = {k[len("base_encoder."):]: v for k, v in state.items()
                 if k.startswith("base_encoder.")}

    saved_arch = ckpt.get("arch")
    arch = arch or saved_arch
    if arch is None:
        raise UserError(f"{path}: the checkpoint does not record its arch; "
                        f"pass arch (one of: {', '.join(moco.ARCHS)})")
    if saved_arch is not None and saved_arch != arch:
        raise UserError(f"{path}: the checkpoint holds arch {saved_arch!r}, "
                        f"not the requested {arch!r}")
    saved_kwargs = ckpt.get("backbone_kwargs") or {}
    kwargs = {k: v for k, v in saved_kwargs.items() if k not in TRAINING_ONLY}
    kwargs = {**kwargs, **backbone_kwargs}
    kwargs.pop("num_classes", None)  # the classifier is replaced by the identity anyway
    if arch not in moco.ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(moco.ARCHS)}")
    model = moco.ARCHS[arch](**kwargs, num_classes=0)
    head_name = "head" if isinstance(model, vit.VisionTransformer) else "fc"
    setattr(model, head_name, nn.Identity())
    # drop the projector or classifier
    state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")}

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise UserError(f"{path}: weights do not fit {arch}{kwargs or ''}: {len(missing)} missing "
                        f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                        f"{len(wrong_shape)} of another shape {wrong_shape[:3]}")
    if weights:
        model.load_state_dict(state, strict=True)
    return model

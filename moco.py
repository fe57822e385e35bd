"""MoCo v3, the model of Algorithm 1 in Chen, Xie, He, "An Empirical Study of Training
Self-Supervised Vision Transformers" (ICCV 2021, Sec. 3), computing what the official
`moco/builder.py` computes.

    f_q = backbone + projector + predictor   query encoder, trained by gradients
    f_k = backbone + projector               momentum encoder: f_k <- m * f_k + (1 - m) * f_q,
                                             never a gradient
    loss = ctr(q1, k2) + ctr(q2, k1)         ctr(q, k) = CrossEntropy(q^ . k^T / tau,
                                             positives on the diagonal) * 2 tau

State-dict keys equal the official checkpoints', so a released `state_dict` with its 'module.'
prefix stripped (`strip_prefix`) loads with strict=True:
    base_encoder.*       backbone; projector at head.0 ... head.7 (ViT, 3 layers) or fc.0 ... fc.4
                         (ResNet, 2 layers)
    momentum_encoder.*   the same layout
    predictor.*          predictor.0 ... predictor.4 (ViT) or predictor.0 ... predictor.3
                         (ResNet: no last BN)
Also here: the all-gather of the keys (any number of processes, none included), the momentum
schedule, and the SyncBatchNorm conversion for CUDA DDP. Reading and writing checkpoints:
checkpoint.py; SimCLR and BYOL on the same heads: simclr_byol.py.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import resnet
import vit

# the backbones, by name: ARCHS[arch](num_classes=..., **kwargs) builds one (vit.py, resnet.py)
ARCHS = {**vit.ARCHS, **resnet.ARCHS}
HEAD_BN = ("all", "hidden", "none")


def build_mlp(num_layers, input_dim, mlp_dim, output_dim, last_bn=True, hidden_bn=True):
    """The official MLP: Linear (no bias) layers; hidden ones followed by BN + ReLU, the last one by
    BN without affine parameters when last_bn. Keys 0, 1, 2, ... in order, e.g. 3 layers:
    0 Linear, 1 BN, 2 ReLU, 3 Linear, 4 BN, 5 ReLU, 6 Linear, 7 BN. Linear layers keep PyTorch's
    default initialisation, as in the official code.
    """
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(input_dim if i == 0 else mlp_dim,
                                output_dim if last else mlp_dim,
                                bias=False))
        if not last:
            if hidden_bn:
                layers.append(nn.BatchNorm1d(mlp_dim))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            # SimCLR's design (BN on the output), with the scale gamma (and shift beta) removed "for
            # simplicity" in the official code: the output is only ever L2-normalised,
            # where a learnt per-channel scale would merely re-weight the cosine similarity.
            layers.append(nn.BatchNorm1d(output_dim, affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def concat_all_gather(x):
    """x (N, C) of every process, concatenated in rank order: (world * N, C). Identity without a
    process group. No gradient flows through (the keys carry none). All processes must
    pass the same N."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def at_least_fp32(x):
    """x in fp32 if it came in a 16-bit dtype (autocast); fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def contrastive_loss(q, k, T):
    """ctr(q, k) of Algorithm 1 for this process's queries q (N, C) against the keys k (N, C) of
    all processes."""
    # In fp32 even under autocast: a bf16 logit q^.k^ / tau keeps 8 bits of mantissa, a step of
    # ~0.02 at 1/tau = 5 (8x coarser than the fp16 of the official code), while the positives and
    # the hard negatives differ by little more. Outside autocast this changes nothing.
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(at_least_fp32(q), dim=1)
        k = concat_all_gather(F.normalize(at_least_fp32(k), dim=1))  # (world * N, C)
        logits = q @ k.T / T  # (N, world * N): every other image's key, of any process: negative
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        # the positive: the key of the same image
        labels = torch.arange(len(q), device=q.device) + len(q) * rank
        # Why * 2 tau (Algorithm 1: "return 2 * tau * loss"): dCE/dlogits = p - y
        # (softmax minus one-hot) and the logits are q^.k^ / tau, so without the factor each q^
        # receives (1/N) sum_j (p_j - y_j) k^_j / tau, a gradient that scales as 1/tau. Times 2 tau
        # the 1/tau cancels: (2/N) sum_j (p_j - y_j) k^_j, of norm at most 4/N for every tau
        # (sum_j |p_j - y_j| <= 2, |k^_j| = 1). tau then only shapes p (how much the hard
        # negatives weigh), not the scale of the gradient, so changing tau does not silently
        # change the effective learning rate.
        # The 2 matches BYOL at large tau:
        # 2 tau CE = 2 tau log(world N) - 2 q^.k^+ + 2 mean_j q^.k^_j + O(1/tau),
        # i.e. BYOL's loss 2 - 2 q^.k^+ plus a push away from the mean key.
        return F.cross_entropy(logits, labels) * (2 * T)


class MoCo(nn.Module):
    """MoCo v3 around a backbone of vit.py (projector at `head`) or resnet.py (projector at `fc`).

    backbone: a VisionTransformer or ResNet; its classifier is replaced by the projector.
    dim: output size of projector and predictor (256); mlp_dim: their hidden size (4096);
    T: temperature tau.
    Ablations (paper Sec. 6, "Prediction head" and "BatchNorm in MLP heads", ViT-B 300 epochs:
    76.5 with predictor and all BN; m = 0 is an argument of forward):
      predictor=False  no prediction MLP (queries = projector outputs): MoCo v3 without BYOL's
                       predictor (75.5).
      head_bn='all'    the official heads: BN after every hidden layer, and BN (no affine) after the
                       last layer of the projector and of the ViT predictor
                       (the ResNet predictor has none).
      head_bn='hidden' BN after hidden layers only: the last-layer BNs are removed
                       (BYOL's heads, appendix A).
      head_bn='none'   no BN anywhere in the heads (hidden layers are Linear + ReLU; 74.4,
                       at batch 2048: 4096 did not converge). Linear layers stay bias-free in every
                       mode, as the official ResNet predictor's BN-free last layer is.
    With m = 0 in forward the momentum update copies f_q into f_k each step, so the keys come from
    the query encoder's weights (the SimCLR-like case; the keys still get no gradient).
    """

    def __init__(self, backbone, dim=256, mlp_dim=4096, T=1.0, predictor=True, head_bn="all"):
        super().__init__()
        if head_bn not in HEAD_BN:
            raise ValueError(f"head_bn must be one of {HEAD_BN}, got {head_bn!r}")
        self.T = T
        is_vit = isinstance(backbone, vit.VisionTransformer)
        head_name = "head" if is_vit else "fc"  # where the backbone keeps its classifier
        hidden_bn, last_bn = head_bn != "none", head_bn == "all"
        # Projector: 3 layers for ViT, 2 for ResNet (Sec. 5, "MLP heads"), in place
        # of the classifier.
        setattr(backbone, head_name,
                build_mlp(3 if is_vit else 2, backbone.num_features, mlp_dim, dim,
                          last_bn, hidden_bn))
        self.base_encoder = backbone
        self.momentum_encoder = copy.deepcopy(backbone)  # initialised equal to f_q
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False  # updated only by the moving average
        self.predictor = (build_mlp(2, dim, mlp_dim, dim, last_bn and is_vit, hidden_bn)
                          if predictor else nn.Identity())

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        """theta_k <- m * theta_k + (1 - m) * theta_q over the parameters only, as the official code
        (the momentum encoder's BN running statistics stay its own), with its arithmetic,
        bit for bit. m = 0 copies f_q."""
        for param_k, param_q in zip(self.momentum_encoder.parameters(),
                                    self.base_encoder.parameters()):
            param_k.mul_(m).add_(param_q * (1.0 - m))

    def forward(self, x1, x2, m):
        """x1, x2: two augmented views (B, 3, H, W) of the same B images; m: momentum
        (python float) -> loss."""
        # Momentum update first, before the keys, as the official code does. Algorithm 1 updates
        # after the optimizer step instead: the same sequence of weights, shifted by one call.
        self.update_momentum_encoder(m)
        # queries (B, dim): backbone + projector (the backbone's classifier) + predictor, crop by
        # crop, so that every BN (heads; ResNet) normalises one crop's batch, as the official code
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():  # keys: no graph, no gradient (stop-gradient on f_k)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)  # (B, dim)
        return self.loss(q1, k2) + self.loss(q2, k1)  # symmetrised

    def loss(self, q, k):
        """ctr(q, k); simclr_byol.BYOL replaces it by BYOL's loss, the rest of the model
        being the same."""
        return contrastive_loss(q, k, self.T)


def adjust_moco_momentum(e, moco_m, epochs, cosine=True):
    """Key-encoder momentum at fractional epoch e: from moco_m to 1 with a half-cosine (BYOL), or
    moco_m throughout. m = 0 stays 0: the paper's ablation (keys from the current query weights)."""
    if not cosine or moco_m == 0:
        return moco_m
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * e / epochs)) * (1.0 - moco_m)


def build_moco(arch, dim=256, mlp_dim=4096, T=1.0, *, predictor=True, head_bn="all",
               **backbone_kwargs):
    """MoCo v3 in one call, the two steps of train_pretrain.py (for the tests and bench.py): the
    backbone with num_classes=mlp_dim, as the official code builds it (its classifier is then
    replaced by the projector), zero_init_residual=True for ResNets unless given; then MoCo."""
    if arch in resnet.ARCHS:
        backbone_kwargs = {"zero_init_residual": True, **backbone_kwargs}
    backbone = ARCHS[arch](**{**backbone_kwargs, "num_classes": mlp_dim})
    return MoCo(backbone, dim, mlp_dim, T, predictor=predictor, head_bn=head_bn)


def convert_sync_batchnorm(model):
    """Every BN -> SyncBatchNorm, so that BN statistics (heads; ResNet and conv-stem backbones) span
    the global batch of each crop, as the official training does. CUDA DDP only:
    SyncBatchNorm raises on CPU tensors."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)

"""SimCLR (Chen et al., 2020) and BYOL (Grill et al., 2020) around the backbones and heads of
moco.py: two more frameworks the MoCo v3 paper (Chen, Xie, He, ICCV 2021) trains ViTs with.

Sec. 4.2 (Fig. 6; ViT-B/16, 100 epochs, AdamW, batch 4096; SimCLR lr 2e-4 wd 0.1,
BYOL lr 1e-4 wd 0.03): the frozen random patch projection (backbone kwarg stop_grad_conv1=True) is
not a MoCo trick, it lifts SimCLR by 0.8 and BYOL by 1.3 points. Sec. 6.1, Table 4 (linear probing;
the same trick in all four, lr and wd swept per framework):
                      MoCo v3   SimCLR   BYOL   SwAV
    ViT-S/16, 300 ep    72.5     69.0    71.0   67.1
    ViT-B/16, 300 ep    76.5     73.9    73.9   71.6
    R-50, 800 ep        73.8     70.4    74.3   71.8
Their recipes (lr, wd, tau, m, crop-min per backbone family, from their papers or, on ViTs, from
the MoCo v3 paper) are recipes.py's RECIPES; train_pretrain.py --help shows the one that will run.

    f = backbone + projector (+ predictor)  the heads of moco.MoCo:
                                            3-layer projector for ViT, 2 for ResNet
    SimCLR  loss = nt_xent(f(x1), f(x2))    no momentum encoder, no predictor, gradients
                                            through both views
    BYOL    loss = 2 - 2 cos(q1, k2) + (2 - 2 cos(q2, k1))   queries from predictor,
            keys from the momentum encoder (no gradient), no negatives: moco.MoCo with another loss.
            Heads: BN in the hidden layers only (head_bn='hidden'), as the paper's BYOL+ViT
            (appendix A) and BYOL itself.
All three are called model(x1, x2, m) -> loss (SimCLR ignores m), so one training loop runs them.
State-dict keys follow MoCo's (base_encoder.*, and for BYOL momentum_encoder.*, predictor.*),
so checkpoint.load_backbone reads every checkpoint.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import moco
import vit

class _AllGather(torch.autograd.Function):
    """x (n, C) of every process in rank order, (world * n, C). Backward: every process holds a
    gradient for every chunk (its loss reads all of them); their sum goes to the chunk's owner,
    so each process's embeddings get d(sum of all processes' losses)/dx.
    (torch.distributed.nn.functional.all_gather does the same but is deprecated in torch 2.x and
    raises under torch.compile; this uses public collectives only.)"""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # (world * n, C): the sum over processes
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


@torch.compiler.disable  # collectives run eagerly, also inside a torch.compile'd model
def all_gather_with_grad(x):
    """x (n, C) of every process in rank order, (world * n, C), with gradients (_AllGather).
    Identity alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def nt_xent(z1, z2, T):
    """SimCLR's loss for this process's two views z1, z2 (n, C) of n images, against all
    processes' views.

    Each of the 2M views of the global batch (M images) is an anchor; its positive is the other view
    of its image, its negatives the other 2M - 2 views. loss = loss_1 + loss_2,
    each the mean cross-entropy over the anchors of one view, as the official `add_contrastive_loss`
    (loss_a + loss_b), times 2 tau. The official SimCLR code does not scale; the MoCo v3 paper
    scales its own loss by 2 tau (Sec. 5, "Loss") so that, at fixed lr and wd, the gradient does not
    grow as 1/tau (see moco.contrastive_loss). We scale SimCLR the same way so that lr, wd and tau
    carry over between the frameworks; divide by 2 tau to compare with the official loss values.
    With AdamW (the paper's ViT optimizer) a constant factor changes the updates only through eps.
    """
    with torch.autocast(z1.device.type, enabled=False):  # fp32 logits, as moco.contrastive_loss
        z1 = F.normalize(moco.at_least_fp32(z1), dim=1)
        z2 = F.normalize(moco.at_least_fp32(z2), dim=1)
        # (2M, C): first views, then second
        z = torch.cat([all_gather_with_grad(z1), all_gather_with_grad(z2)])
        M, n = len(z) // 2, len(z1)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        i = torch.arange(n, device=z1.device) + n * rank  # this process's images, globally
        # per anchor: itself, its positive
        self_col, pos_col = torch.cat([i, i + M]), torch.cat([i + M, i])
        logits = torch.cat([z1, z2]) @ z.T / T  # (2n, 2M)
        is_self = self_col[:, None] == torch.arange(2 * M, device=z1.device)  # (2n, 2M)
        logits = logits.masked_fill(is_self, float("-inf"))  # an anchor is not its own negative
        # the sum over the 2n anchors / n = loss_1 + loss_2
        return F.cross_entropy(logits, pos_col, reduction="sum") / n * (2 * T)


class SimCLR(nn.Module):
    """SimCLR around a backbone of vit.py or resnet.py: moco.MoCo's query side without predictor,
    contrasted with itself. Arguments as moco.MoCo's
    (dim, mlp_dim, T = tau, head_bn in moco.HEAD_BN).

    The projector normalises each view's batch alone (BN per crop, as moco.MoCo and BYOL's code);
    the official SimCLR code puts both views in one BN batch (paper appendix A). The two differ only
    with BN in the heads.
    """

    def __init__(self, backbone, dim=256, mlp_dim=4096, T=0.1, head_bn="all"):
        super().__init__()
        if head_bn not in moco.HEAD_BN:
            raise ValueError(f"head_bn must be one of {moco.HEAD_BN}, got {head_bn!r}")
        self.T = T
        is_vit = isinstance(backbone, vit.VisionTransformer)
        projector = moco.build_mlp(3 if is_vit else 2, backbone.num_features, mlp_dim, dim,
                                   last_bn=head_bn == "all", hidden_bn=head_bn != "none")
        # in place of the classifier, as in moco.MoCo
        setattr(backbone, "head" if is_vit else "fc", projector)
        self.base_encoder = backbone

    def forward(self, x1, x2, m=None):
        """x1, x2: two views (B, 3, H, W) of the same B images; m: unused
        (no momentum encoder) -> loss."""
        return nt_xent(self.base_encoder(x1), self.base_encoder(x2), self.T)  # (B, dim) each


class BYOL(moco.MoCo):
    """BYOL: moco.MoCo (the same modules, keys, momentum update and call) with BYOL's loss.
    T is unused."""

    def __init__(self, backbone, dim=256, mlp_dim=4096, T=1.0, predictor=True, head_bn="hidden"):
        super().__init__(backbone, dim, mlp_dim, T, predictor, head_bn)

    @staticmethod
    def loss(q, k):
        """BYOL's normalised MSE |q^ - k^|^2 = 2 - 2 q^.k^, averaged over this process's batch,
        in fp32 (as moco.contrastive_loss). No negatives, nothing to gather: DDP's average of the
        processes' means is the mean over the global batch."""
        q, k = moco.at_least_fp32(q), moco.at_least_fp32(k)
        return (2 - 2 * (F.normalize(q, dim=1) * F.normalize(k, dim=1)).sum(dim=1)).mean()

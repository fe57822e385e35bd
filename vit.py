"""Vision Transformer for MoCo v3 (Chen, Xie, He, ICCV 2021), owned here rather than
borrowed from timm.

What the paper changes in a plain ViT (Dosovitskiy et al.) and where it lives in this file:
  * fixed 2-D sin-cos position embedding (Sec. 4.1, ablated in Sec. 6)  `build_2d_sincos_pos_embed`
  * a frozen random patch projection, the stability trick (Sec. 4.2) .. `stop_grad_conv1`
  * MoCo v3's initialisation: Xavier-uniform Linear weights, `qkv` as three D x D matrices, class
    token N(0, 1e-6), patch projection Xavier-uniform on its flattened fan-in ...... `_init_weights`
  * the configurations of Table 1 (ViT-S has 12 heads, not DeiT's 6) and the convolutional stem of
    Xiao et al., "Early Convolutions Help Transformers See Better" (Sec. 6)
    ........................................................................ factories at the bottom
  * ablations of Sec. 6: position embedding sincos / learned / none; with or without the class
    token and the final LayerNorm before average pooling ............. `VisionTransformer` arguments

Parameter names equal timm's ViT and hence the released MoCo v3 checkpoints
(`vit-s-300ep.pth.tar`, ...): `cls_token`, `pos_embed`, `patch_embed.proj.*`,
`blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`, `head.*`,
so their weights load with `strict=True` and no renaming. Depends on torch only.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def build_2d_sincos_pos_embed(grid_h, grid_w, dim, temperature=10000.0):
    """Fixed 2-D sin-cos position embedding of MoCo v3, (1 + grid_h * grid_w, dim) with a zero row
    for the class token.

    Per axis dim/4 frequencies omega_i = 1 / temperature^(i / (dim/4)). Patch n (row-major,
    as the patch projection flattens its output) sits at row r = n // grid_w and
    column c = n % grid_w; its embedding is
    [sin(r*omega), cos(r*omega), sin(c*omega), cos(c*omega)].
    The official code names the first coordinate "w" but, through `torch.meshgrid`'s 'ij' indexing,
    feeds it the row index; we reproduce its numbers exactly so that a model initialised here equals
    one initialised there.
    """
    if dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos position "
                         f"embedding, got {dim}")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)  # (D/4,)
    n = torch.arange(grid_h * grid_w, dtype=torch.float32)
    rows = torch.div(n, grid_w, rounding_mode="floor")[:, None] * omega  # (L, D/4)
    cols = torch.remainder(n, grid_w)[:, None] * omega  # (L, D/4)
    pe = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)  # (L, D)
    # (1 + L, D): the class token gets no position
    return torch.cat([torch.zeros(1, dim), pe], dim=0)


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, L, D), L = (H/p)(W/p). `proj` is the layer the
    paper freezes."""

    def __init__(self, patch_size=16, in_chans=3, embed_dim=768, conv_stem=False):
        super().__init__()
        self.patch_size = patch_size
        if not conv_stem:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            return
        # Xiao et al.'s stem (MoCo v3 Sec. 6, "ViT-BN/7" style): four 3x3 stride-2 convs
        # + BN + ReLU, channels D/8 doubling each time, then a 1x1 conv to D. Total stride 16,
        # so it replaces a 16x16 patchify.
        if patch_size != 16 or embed_dim % 8 != 0:
            raise ValueError(f"the conv stem needs patch_size 16 and embed_dim divisible by 8, "
                             f"got patch_size {patch_size}, embed_dim {embed_dim}")
        layers, c_in, c_out = [], in_chans, embed_dim // 8
        for _ in range(4):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        # keys proj.0 ... proj.12, as in the official checkpoints
        self.proj = nn.Sequential(*layers)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, L, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # one fused matmul for q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape  # (B, N, C): batch, tokens, width; h heads of C/h channels each
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, h, C // h)  # (B, N, 3C) -> (B, N, 3, h, C/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (3, B, h, N, C/h) -> each (B, h, N, C/h)
        # softmax(q k^T / sqrt(C/h)) v; flash / memory-efficient kernels on CUDA,
        # a fused kernel on CPU
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # CPU bf16 autocast: torch's fused CPU kernel runs its backward ~3x slower in bf16
            # than in fp32 at ViT sizes (BENCHMARKS.md), so attention runs in fp32 there
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            x = x.to(q.dtype)  # (B, h, N, C/h)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, C/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, h, C/h) -> (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al.): drop a sample's whole residual branch with probability p,
    in training only."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)  # rescale so the expectation is unchanged


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT backbone + `head`. forward_features: (B, 3, H, W) -> (B, D);
    forward: -> (B, num_classes).

    Ablations of Sec. 6 (ViT-B, 300 epochs, linear probing):
      pos_embed: 'sincos' (fixed, the paper's default; 76.5),
        'learned' (trained, N(0, 0.02) init; 76.1) or 'none' (74.9). The `pos_embed` tensor exists
        in all three cases (zeros and frozen for 'none'), so the three share one state-dict layout.
      class_token / final_norm / pool, the class-token table: "w/ [CLS]" (76.5) is the default;
        "w/o [CLS]; LN+pool" (69.7) is class_token=False, pool='avg'; "w/o [CLS]; pool" (76.3) adds
        final_norm=False. class_token=False: no `cls_token` parameter and
        a `pos_embed` of L rows, not 1 + L.
        final_norm=False: no final LayerNorm (`norm` is the identity, no norm.* parameters).
        pool: 'token' (the class token's output) or 'avg' (the mean of the patch tokens;
        with a class token it stays in the sequence and attends, but is left out of the mean).
    grad_ckpt: activation checkpointing of the blocks (same numbers, less memory,
    ~1/3 more compute).
    Inputs of another size than `img_size` are accepted: the sin-cos table is recomputed for the new
    grid and a learned one is bicubically interpolated (e.g. a 224-px checkpoint
    fine-tuned at 384 px).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0,
                 conv_stem=False, pos_embed="sincos", pool="token", stop_grad_conv1=False,
                 grad_ckpt=False, class_token=True, final_norm=True):
        super().__init__()
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed must be 'sincos', 'learned' or 'none', got {pos_embed!r}")
        if pool not in ("token", "avg") or (pool == "token" and not class_token):
            raise ValueError(f"pool must be 'token' (needs class_token=True) or 'avg', "
                             f"got {pool!r}")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.pos_embed_type, self.pool = (
            img_size, patch_size, pos_embed, pool)
        self.num_features = self.embed_dim = embed_dim
        # recompute each block in backward: memory O(1 block) instead of O(depth)
        self.grad_ckpt = grad_ckpt
        self.grid = img_size // patch_size

        self.num_prefix = 1 if class_token else 0  # tokens before the L patch tokens
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, conv_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.grid ** 2, embed_dim),
                                      requires_grad=(pos_embed == "learned"))
        # stochastic depth grows linearly
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i])
                                    for i in range(depth))
        # Sec. 6: without a class token, this LN before the average pooling costs
        # 6.6 points (69.7 vs 76.3)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

        if stop_grad_conv1 and not conv_stem:
            # Sec. 4.2: a random, frozen patch projection removes the gradient spikes of the first
            # layer that make large-batch ViT training unstable (Fig. 4-6). Frozen means no
            # gradient, so no optimizer update and no weight decay either. As in the official code
            # it applies to the linear patchify projection only; a conv stem (Sec. 6) is the other
            # remedy and is always trained.
            for p in self.patch_embed.proj.parameters():
                p.requires_grad = False

    def _init_weights(self):
        with torch.no_grad():
            if self.pos_embed_type == "sincos":
                pe = build_2d_sincos_pos_embed(self.grid, self.grid, self.embed_dim)  # (1 + L, D)
                # no zero row without a class token
                self.pos_embed.copy_(pe[1 - self.num_prefix:][None])
            elif self.pos_embed_type == "learned":
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            for name, m in self.named_modules():
                if isinstance(m, nn.Linear):
                    if name.endswith("qkv"):
                        # q, k and v are three D x D maps: Xavier bound sqrt(6 / (D + D)),
                        # not that of a 3D x D
                        bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                        nn.init.uniform_(m.weight, -bound, bound)
                    else:
                        nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=1e-6)
            proj = self.patch_embed.proj
            if isinstance(proj, nn.Conv2d):
                # Xavier-uniform, treating the conv as a Linear
                # from its flattened 3*p*p inputs to D outputs
                fan_in = proj.weight[0].numel()
                bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
                nn.init.uniform_(proj.weight, -bound, bound)
                nn.init.zeros_(proj.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"} if self.cls_token is not None else {"pos_embed"}

    def pos_embed_for(self, h, w):
        """Position embedding (1, P + h*w, D) for an h x w patch grid, P = 1 row for the class token
        (0 for sin-cos) or P = 0 without one; the number 0 when there is none."""
        if self.pos_embed_type == "none":
            return 0.0
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            # (P + h*w, D)
            pe = build_2d_sincos_pos_embed(h, w, self.embed_dim)[1 - self.num_prefix:]
            return pe.to(self.pos_embed)[None]
        cls_pe, patch_pe = self.pos_embed[:, :self.num_prefix], self.pos_embed[:, self.num_prefix:]
        patch_pe = patch_pe.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch_pe = F.interpolate(patch_pe, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pe, patch_pe.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p != 0 or W % p != 0:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p} "
                             f"(the model was built for {self.img_size}x{self.img_size})")
        x = self.patch_embed(x)  # (B, L, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + L, D)
        x = x + self.pos_embed_for(H // p, W // p)
        for blk in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.norm(x)  # the identity when final_norm=False
        return x[:, 0] if self.pool == "token" else x[:, self.num_prefix:].mean(dim=1)  # (B, D)

    def forward(self, x):
        return self.head(self.forward_features(x))


# Table 1 of the paper. Keyword arguments (img_size, patch_size, num_classes, drop_path_rate,
# stop_grad_conv1, pos_embed, pool, and even depth or embed_dim for small
# experiments) override these.
def _vit(kwargs, **config):
    return VisionTransformer(**{**config, **kwargs})


def vit_tiny(**kwargs):
    return _vit(kwargs, embed_dim=192, depth=12, num_heads=3)


def vit_small(**kwargs):
    # 12 heads: the paper's ViT-S (DeiT-S has 6)
    return _vit(kwargs, embed_dim=384, depth=12, num_heads=12)


def vit_base(**kwargs):
    return _vit(kwargs, embed_dim=768, depth=12, num_heads=12)


def vit_large(**kwargs):
    return _vit(kwargs, embed_dim=1024, depth=24, num_heads=16)


def vit_huge(**kwargs):
    return _vit(kwargs, embed_dim=1280, depth=32, num_heads=16, patch_size=14)


def vit_conv_small(**kwargs):
    # The conv stem replaces one transformer block so the FLOPs stay those of ViT-S
    # (Sec. 6): depth 11
    return _vit(kwargs, embed_dim=384, depth=11, num_heads=12, conv_stem=True)


def vit_conv_base(**kwargs):
    return _vit(kwargs, embed_dim=768, depth=11, num_heads=12, conv_stem=True)


ARCHS = {f.__name__: f for f in (vit_tiny, vit_small, vit_base, vit_large, vit_huge,
                                 vit_conv_small, vit_conv_base)}

"""vit.py and resnet.py against torchvision's models, hand values of the sin-cos table,
MoCo v3's init."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import resnet
import vit


# ---------------------------------------------------------------------------- ResNet vs torchvision
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_equals_torchvision(arch):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    # Non-trivial BN statistics and affine parameters so eval mode is really tested.
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    ours = getattr(resnet, arch)(num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        ref.train(train), ours.train(train)
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
    # Training mode updated the running statistics identically.
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_resnet_parameter_count_and_seeded_init_equal_torchvision(arch):
    torch.manual_seed(1)
    ref = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    torch.manual_seed(1)
    ours = getattr(resnet, arch)(zero_init_residual=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    # same RNG draws in the same order: bit-identical initialisation
    if arch in ("resnet18", "resnet50"):
        for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
            assert torch.equal(a, b), k


def test_resnet200_depth_and_small_stem():
    m = resnet.resnet200(num_classes=0)
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 24, 36, 3]
    assert isinstance(m.fc, nn.Identity) and m.num_features == 2048
    s = resnet.resnet18(small_stem=True, num_classes=0).eval()
    assert s.conv1.weight.shape == (64, 3, 3, 3) and s.conv1.stride == (1, 1)
    assert s.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    # the 32x32 input reaches layer4 at 4x4 (stride 8), not 1x1 as with the ImageNet stem
    feats = {}
    s.layer4.register_forward_hook(lambda mod, i, o: feats.update(x=o))
    s(torch.randn(1, 3, 32, 32))
    assert feats["x"].shape[-2:] == (4, 4)


# ----------------------------------------------------------------------------- ViT vs torchvision
def _torchvision_vit_into_ours(ref, depth):
    """Map torchvision's ViT state dict onto timm/MoCo v3 names (the mapping lives here,
    in the test)."""
    sd = ref.state_dict()
    out = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"],
           "patch_embed.proj.weight": sd["conv_proj.weight"],
           "patch_embed.proj.bias": sd["conv_proj.bias"],
           "norm.weight": sd["encoder.ln.weight"], "norm.bias": sd["encoder.ln.bias"],
           "head.weight": sd["heads.head.weight"], "head.bias": sd["heads.head.bias"]}
    for i in range(depth):
        p = f"encoder.layers.encoder_layer_{i}."
        for ours_name, theirs in [("norm1", "ln_1"), ("norm2", "ln_2"),
                                  ("attn.qkv", "self_attention.in_proj"),
                                  ("attn.proj", "self_attention.out_proj"),
                                  ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.3")]:
            sep = "_" if theirs.endswith("in_proj") else "."
            out[f"blocks.{i}.{ours_name}.weight"] = sd[p + theirs + sep + "weight"]
            out[f"blocks.{i}.{ours_name}.bias"] = sd[p + theirs + sep + "bias"]
    return out


@pytest.mark.parametrize("img", [32, 48])
def test_vit_equals_torchvision(img):
    torch.manual_seed(0)
    depth, dim, heads = 2, 64, 4
    ref = torchvision.models.VisionTransformer(image_size=img, patch_size=8, num_layers=depth,
                                               num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim,
                                               num_classes=7).eval()
    with torch.no_grad():  # torchvision zero-inits some tensors; make every weight matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = vit.VisionTransformer(img_size=img, patch_size=8, embed_dim=dim, depth=depth,
                                 num_heads=heads, num_classes=7, pos_embed="learned",
                                 pool="token").eval()
    ours.load_state_dict(_torchvision_vit_into_ours(ref, depth), strict=True)
    x = torch.randn(3, 3, img, img)
    assert (ours(x) - ref(x)).abs().max() <= 1e-5


def test_vit_state_dict_layout():
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5)
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += [f"blocks.{i}.{k}" for i in range(2) for k in block]
    expected += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(m.state_dict()) == expected
    stem = vit.vit_conv_small(num_classes=0, depth=1)
    keys = [k for k in stem.state_dict() if k.startswith("patch_embed")]
    convs = [k for k in keys if k.endswith("weight") and stem.state_dict()[k].ndim == 4]
    assert convs == [f"patch_embed.proj.{i}.weight" for i in (0, 3, 6, 9, 12)]
    assert [stem.state_dict()[k].shape[0] for k in convs] == [48, 96, 192, 384, 384]


def _vit_params(dim, depth, patch, img, classes, in_chans=3):
    """Parameter count of a ViT by formula: patchify, cls, pos, blocks (LN, qkv, proj, MLP x4, LN),
    final LN, head."""
    per_block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim \
        + (4 * dim * dim + 4 * dim) + (4 * dim * dim + dim)
    tokens = (img // patch) ** 2 + 1
    return (in_chans * patch * patch * dim + dim) + dim + tokens * dim + depth * per_block \
        + 2 * dim + (dim * classes + classes)


@pytest.mark.parametrize("name,dim,depth,patch", [("vit_small", 384, 12, 16),
                                                  ("vit_base", 768, 12, 16),
                                                  ("vit_tiny", 192, 12, 16),
                                                  ("vit_huge", 1280, 32, 14)])
def test_vit_parameter_count(name, dim, depth, patch):
    if name == "vit_huge":  # 632M parameters: build it on the meta device, no memory needed
        with torch.device("meta"):
            m = vit.ARCHS[name](num_classes=1000)
    else:
        m = vit.ARCHS[name](num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == _vit_params(dim, depth, patch, 224, 1000)
    if name == "vit_base":
        assert sum(p.numel() for p in m.parameters()) == 86_567_656  # ViT-B/16, as published


def test_vit_configs_of_table1():
    cfg = {n: (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.patch_size)
           for n, m in ((n, vit.ARCHS[n](num_classes=0, depth=1) if n in ("vit_large", "vit_huge")
                         else vit.ARCHS[n](num_classes=0)) for n in vit.ARCHS)}
    assert cfg["vit_small"] == (384, 12, 12, 16) and cfg["vit_base"] == (768, 12, 12, 16)
    assert cfg["vit_large"][::2] == (1024, 16) and cfg["vit_huge"][::2] == (1280, 16)
    assert cfg["vit_huge"][3] == 14 and cfg["vit_tiny"] == (192, 12, 3, 16)
    assert cfg["vit_conv_small"] == (384, 11, 12, 16) and cfg["vit_conv_base"] == (768, 11, 12, 16)
    assert vit.vit_large(num_classes=0, depth=24).blocks.__len__() == 24


# --------------------------------------------------------------------------- MoCo v3 initialisation
def test_sincos_values_at_pinned_coordinates():
    dim, g = 16, 4
    pe = vit.build_2d_sincos_pos_embed(g, g, dim)
    assert pe.shape == (1 + g * g, dim) and torch.equal(pe[0], torch.zeros(dim))
    omega = [1.0 / 10000 ** (i / 4) for i in range(4)]
    for n in (0, 1, 5, 7, 14):  # patch n at row n // 4, column n % 4
        r, c = n // g, n % g
        expect = [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega] \
            + [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
        assert torch.allclose(pe[1 + n], torch.tensor(expect), atol=1e-6), n
    # patch 1 is row 0, column 1: its row half is that of the origin, its column half is not
    assert torch.equal(pe[2, :8], pe[1, :8]) and not torch.equal(pe[2, 8:], pe[1, 8:])


def test_vit_init_matches_moco_v3():
    torch.manual_seed(0)
    dim = 96
    m = vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=dim, depth=2, num_heads=4,
                              num_classes=10)
    assert not m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed[0], vit.build_2d_sincos_pos_embed(4, 4, dim))
    assert m.cls_token.std() < 3e-6 and m.cls_token.abs().max() > 0
    qkv = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (dim + dim))
    # not the 3D x D bound sqrt(6/(4D))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    fc1 = m.blocks[1].mlp.fc1.weight
    bound_fc1 = math.sqrt(6 / (dim + 4 * dim))
    assert fc1.abs().max() <= bound_fc1 and fc1.abs().max() > 0.95 * bound_fc1
    assert all(l.bias.abs().max() == 0 for l in m.modules() if isinstance(l, nn.Linear))
    w = m.patch_embed.proj.weight
    bound_p = math.sqrt(6 / (3 * 16 * 16 + dim))
    assert w.abs().max() <= bound_p and w.abs().max() > 0.95 * bound_p
    assert m.patch_embed.proj.bias.abs().max() == 0
    # uniform on [-b, b] has std b / sqrt(3)
    assert abs(qkv.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_stop_grad_conv1_freezes_patch_projection():
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=3, stop_grad_conv1=True)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.patch_embed.proj.weight.grad is None and m.patch_embed.proj.bias.grad is None
    assert m.blocks[0].attn.qkv.weight.grad is not None and m.pos_embed.grad is None
    free = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                 num_classes=3)
    free(torch.randn(2, 3, 32, 32)).sum().backward()
    assert free.patch_embed.proj.weight.grad.abs().sum() > 0


def test_pos_embed_and_pool_variants():
    x = torch.randn(2, 3, 32, 32)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    learned = vit.VisionTransformer(pos_embed="learned", **kw)
    assert learned.pos_embed.requires_grad and learned.pos_embed.std() > 0.01
    none = vit.VisionTransformer(pos_embed="none", **kw).eval()
    assert not none.pos_embed.requires_grad and none.pos_embed.abs().max() == 0
    # without position information, permuting the patches leaves the class token's output unchanged
    perm = x.reshape(2, 3, 4, 8, 4, 8).flip(2).reshape(2, 3, 32, 32)  # swap patch rows
    assert torch.allclose(none(x), none(perm), atol=1e-5)
    avg = vit.VisionTransformer(pool="avg", **kw).eval()
    tokens = {}
    avg.norm.register_forward_hook(lambda mod, i, o: tokens.update(x=o))
    out = avg(x)
    assert (torch.allclose(out, tokens["x"][:, 1:].mean(1))
            and not torch.allclose(out, tokens["x"][:, 0]))


def test_other_input_sizes():
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    m = vit.VisionTransformer(**kw).eval()
    big = vit.VisionTransformer(**{**kw, "img_size": 64}).eval()
    big.load_state_dict({k: v for k, v in m.state_dict().items() if k != "pos_embed"}, strict=False)
    x = torch.randn(2, 3, 64, 64)
    # sin-cos recomputed for the 8x8 grid == built for it
    assert torch.allclose(m(x), big(x), atol=1e-6)
    learned = vit.VisionTransformer(pos_embed="learned", **kw).eval()
    assert learned(x).shape == (2, 32)
    same = learned.pos_embed_for(4, 4)
    assert same is learned.pos_embed
    up = learned.pos_embed_for(8, 8)
    assert up.shape == (1, 65, 32) and torch.equal(up[:, 0], learned.pos_embed[:, 0])


def test_drop_path_is_linear_and_train_only():
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2,
                              num_classes=0, drop_path_rate=0.4)
    assert [b.drop_path.p for b in m.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def test_bad_input():
    with pytest.raises(ValueError, match="30.*16|16.*30"):
        vit.VisionTransformer(img_size=30, patch_size=16)
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="36x36.*8"):
        m(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="pos_embed"):
        vit.VisionTransformer(pos_embed="rope")


def test_grad_ckpt_gives_identical_gradients():
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    torch.manual_seed(0)
    a = vit.VisionTransformer(**kw)
    b = vit.VisionTransformer(grad_ckpt=True, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 32, 32)
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


# -------------------------------------------------------------- class token and final LN (Sec. 6)
@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "none"])
def test_without_class_token_and_final_norm(pos_embed):
    """The paper's "w/o [CLS]; LN+pool" (class_token=False, pool='avg') and
    "w/o [CLS]; pool" (final_norm=False)."""
    g, dim = 4, 32
    kw = dict(img_size=32, patch_size=8, embed_dim=dim, depth=2, num_heads=2, num_classes=5,
              pos_embed=pos_embed)
    torch.manual_seed(0)
    with_cls = vit.VisionTransformer(**kw)
    ln_pool = vit.VisionTransformer(class_token=False, pool="avg", **kw).eval()
    pool = vit.VisionTransformer(class_token=False, pool="avg", final_norm=False, **kw).eval()
    # parameters: no cls_token and one position row fewer; without the LN no norm.* either
    names = list(with_cls.state_dict())
    assert list(ln_pool.state_dict()) == [k for k in names if k != "cls_token"]
    assert list(pool.state_dict()) == [k for k in names
                                       if k not in ("cls_token", "norm.weight", "norm.bias")]
    assert ln_pool.pos_embed.shape == pool.pos_embed.shape == (1, g * g, dim)
    n_params = _vit_params(dim, 2, 8, 32, 5)
    assert sum(p.numel() for p in with_cls.parameters()) == n_params
    # class token, its position row
    assert sum(p.numel() for p in ln_pool.parameters()) == n_params - 2 * dim
    # and the LN's weight and bias
    assert sum(p.numel() for p in pool.parameters()) == n_params - 4 * dim
    assert (ln_pool.no_weight_decay() == {"pos_embed"}
            and with_cls.no_weight_decay() == {"pos_embed", "cls_token"})
    # the L patch rows of the table, no zero row for an absent class token
    if pos_embed == "sincos":
        assert torch.equal(ln_pool.pos_embed[0], vit.build_2d_sincos_pos_embed(g, g, dim)[1:])
        assert (ln_pool.pos_embed[0].abs().sum(1) > 0).all()
    # tokens: L patch tokens through the blocks, not 1 + L; output = the mean of the
    # (normalised) tokens
    x = torch.randn(3, 3, 32, 32)
    for model, n_tokens in ((with_cls.eval(), 1 + g * g), (ln_pool, g * g), (pool, g * g)):
        seen = {}
        model.blocks[0].register_forward_hook(lambda mod, i, o: seen.update(n=i[0].shape[1]))
        model.blocks[-1].register_forward_hook(lambda mod, i, o: seen.update(x=o))
        feats = model.forward_features(x)
        assert seen["n"] == n_tokens and feats.shape == (3, dim)
    # no LN: plain mean
    assert torch.allclose(pool.forward_features(x), seen["x"].mean(1), atol=1e-6)
    ln_pool.blocks[-1].register_forward_hook(lambda mod, i, o: seen.update(x=o))
    # LN, then mean
    assert torch.allclose(ln_pool.forward_features(x), ln_pool.norm(seen["x"]).mean(1), atol=1e-6)
    assert isinstance(pool.norm, nn.Identity) and ln_pool(x).shape == (3, 5)
    # other grids: sin-cos recomputed, learned interpolated; L rows either way
    big = ln_pool.pos_embed_for(8, 8)
    if pos_embed == "none":
        assert big == 0.0
    else:
        assert big.shape == (1, 64, dim) and ln_pool(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    if pos_embed == "sincos":
        assert torch.equal(big[0], vit.build_2d_sincos_pos_embed(8, 8, dim)[1:])
    if pos_embed == "learned":
        assert ln_pool.pos_embed_for(g, g) is ln_pool.pos_embed
    # strict round trip of each variant's own state dict
    fresh = vit.VisionTransformer(class_token=False, pool="avg", final_norm=False, **kw).eval()
    fresh.load_state_dict(pool.state_dict(), strict=True)
    assert torch.equal(fresh(x), pool(x))


def test_without_class_token_is_a_bag_of_patches():
    """No class token and no position embedding: permuting the patches changes no number but
    rounding (Sec. 6)."""
    m = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0, pos_embed="none", class_token=False, pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    # patch rows and columns reversed
    perm = x.reshape(2, 3, 4, 8, 4, 8).flip(2).flip(4).reshape(2, 3, 32, 32)
    assert torch.allclose(m(x), m(perm), atol=1e-5)


def test_class_token_switch_errors_and_default_unchanged():
    with pytest.raises(ValueError, match="pool"):
        vit.VisionTransformer(class_token=False)  # pool='token' needs the token
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.manual_seed(0)
    default = vit.VisionTransformer(**kw)
    torch.manual_seed(0)
    explicit = vit.VisionTransformer(class_token=True, final_norm=True, pool="token", **kw)
    assert all(torch.equal(a, b)
               for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))


def test_cpu_bf16_autocast_computes_attention_in_fp32():
    """Under CPU bf16 autocast vit.Attention runs softmax(q k^T / sqrt(d)) v in fp32 (torch's bf16
    CPU kernel is slower), on the bf16 q, k, v the qkv Linear gives: the same as a hand-written
    fp32 attention of those values, and not what the bf16 kernel would return."""
    torch.manual_seed(0)
    attn = vit.Attention(32, 2)
    x = torch.randn(3, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        qkv = attn.qkv(x).reshape(3, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
        bf16_kernel = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
    q, k, v = qkv.float().unbind(0)                               # the bf16 values, in fp32
    a = (q @ k.transpose(-2, -1) / 16 ** 0.5).softmax(-1) @ v     # (3, 2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.proj(a.bfloat16().transpose(1, 2).reshape(3, 9, 32))
    # equal up to one bf16 rounding of the output (the fused kernel sums in its own order)
    assert torch.allclose(out.float(), expected.float(), rtol=8e-3, atol=1e-3)
    assert not torch.equal(a.bfloat16(), bf16_kernel)

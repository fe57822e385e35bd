"""The pretraining recipes as plain data: MoCo v3's (the official CONFIG.md), SimCLR's and BYOL's
on the same backbones, and the demo preset. train_pretrain.py makes them its parser's defaults,
so `python train_pretrain.py --arch vit_base --help` prints the one that will run and a flag
given always wins. RECIPES.md has them as a table, with their sources.
"""
import data

RECIPES = {
    # MoCo v3: the official CONFIG.md (ViT-S/B, 300 epochs; R-50, 100 epochs).
    ('mocov3', 'vit'): dict(
        optimizer='adamw', lr=1.5e-4, weight_decay=0.1, epochs=300, warmup_epochs=40,
        moco_t=0.2, moco_m=0.99, crop_min=0.08, head_bn='all', predictor=True),
    ('mocov3', 'resnet'): dict(
        optimizer='lars', lr=0.6, weight_decay=1e-6, epochs=100, warmup_epochs=10,
        moco_t=1.0, moco_m=0.99, crop_min=0.2, head_bn='all', predictor=True),
    # SimCLR (Chen et al., 2020): no momentum encoder (m is unused), no predictor. On ViTs the lr
    # and wd of the MoCo v3 paper (Sec. 4.2, Fig. 6), which gives no tau: SimCLR's own 0.1.
    # On ResNets SimCLR's recipe: LARS, lr 0.3 x batch/256, wd 1e-6, tau 0.1.
    ('simclr', 'vit'): dict(
        optimizer='adamw', lr=2e-4, weight_decay=0.1, epochs=300, warmup_epochs=40,
        moco_t=0.1, moco_m=0.0, crop_min=0.08, head_bn='all', predictor=False),
    ('simclr', 'resnet'): dict(
        optimizer='lars', lr=0.3, weight_decay=1e-6, epochs=100, warmup_epochs=10,
        moco_t=0.1, moco_m=0.0, crop_min=0.08, head_bn='all', predictor=False),
    # BYOL (Grill et al., 2020): no negatives (tau is unused); heads with BN in the hidden layers
    # only; m from BYOL's 0.996, raised to 1 with a half-cosine. On ViTs the lr and wd of the
    # MoCo v3 paper (Fig. 6); on ResNets BYOL's: LARS, lr 0.2 x batch/256, wd 1.5e-6.
    ('byol', 'vit'): dict(
        optimizer='adamw', lr=1e-4, weight_decay=0.03, epochs=300, warmup_epochs=40,
        moco_t=1.0, moco_m=0.996, crop_min=0.08, head_bn='hidden', predictor=True),
    ('byol', 'resnet'): dict(
        optimizer='lars', lr=0.2, weight_decay=1.5e-6, epochs=100, warmup_epochs=10,
        moco_t=1.0, moco_m=0.996, crop_min=0.08, head_bn='hidden', predictor=True),
}
# MoCo v3's longer R-50 runs (CONFIG.md): from this many epochs on, these values.
LONGER_RESNET_RUNS = {300: dict(lr=0.3), 1000: dict(lr=0.3, weight_decay=1.5e-6, moco_m=0.996)}
# Every ViT recipe freezes the random patch projection (Sec. 4.2: it helps all three frameworks).
PRESETS = {
    # 2 CPU cores, minutes, the 32-px built-in images. m 0.9: a few hundred steps, the keys must
    # follow; no large-batch spikes to cure; crops of >= 30%: both views still show the shape.
    # kNN every 4 epochs: a pass (6,000 images) costs ~18% of an epoch, every 4th ~5%.
    'demo': dict(
        data=data.DEMO_ROOT, arch='vit_tiny', depth=4, embed_dim=128, num_heads=4,
        img_size=32, patch_size=4, epochs=8, batch_size=128, lr=2e-3, warmup_epochs=1,
        moco_mlp_dim=1024, moco_m=0.9, stop_grad_conv1=False, crop_min=0.3, workers=1,
        knn_every=4),
}


def defaults(framework, arch, epochs=None, preset=None):
    """train_pretrain.py's parser defaults: the recipe of the framework and the backbone family
    (for MoCo v3's ResNets, of the run's length), then the preset's values."""
    family = 'vit' if arch.startswith('vit') else 'resnet'
    defaults = dict(RECIPES[framework, family], stop_grad_conv1=family == 'vit')
    epochs = epochs or PRESETS.get(preset, {}).get('epochs') or defaults['epochs']
    if (framework, family) == ('mocov3', 'resnet'):
        for longer, values in LONGER_RESNET_RUNS.items():
            if epochs >= longer:
                defaults.update(values)
    preset_values = dict(PRESETS.get(preset, {}))
    if preset and preset_values['arch'] != arch:      # another arch: its own shape and lr
        for name in ('depth', 'embed_dim', 'num_heads', 'lr', 'arch'):
            preset_values.pop(name)
    return {**defaults, **preset_values}

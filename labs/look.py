"""Look inside a checkpoint: what its features do, drawn. The numbers of training (loss, kNN top-1)
say how well a backbone does; these figures show what it does:

  neighbours.png     val/ images and their k nearest train/ images by the cosine similarity of the
                     kNN monitor (evaluation.knn_neighbours: the neighbours that vote in its
                     top-1), framed green when the class matches; beside them the same queries
                     for the network at random initialisation (or a second checkpoint).
  feature_space.png  the val/ features projected on their first two principal components,
                     coloured by class, trained vs random init (or the second checkpoint).
  attention.png      ViTs: the class token's attention to the patches in each head of the last
                     block, and its mean over the heads, as DINO's Fig. 1 (Caron et al. 2021);
                     a pool='avg' ViT has no class token: the mean token's (its feature) instead.
  patch_pca.png      ViTs: the first three principal components of the patch tokens of a few
                     images, computed jointly over them, as RGB at patch resolution (DINOv2's
                     figure, Oquab et al. 2023): patches of one colour are ones the network groups.
Every figure names the checkpoint and the kNN top-1 (k = 20, T = 0.07, the monitor's) of the
features it draws.

    python labs/look.py output/pretrain/checkpoint.pth                   # the built-in images
    python labs/look.py vit-s-300ep.pth.tar /data/imagenet -o look -k 8   # the official release
    python labs/look.py runs/a/checkpoint.pth --compare runs/b/checkpoint.pth

CHECKPOINT: any file the scripts read (checkpoint.load_backbone): ours of every framework, the
official MoCo v3 release, a bare backbone (then --arch). DATA: DATA/train/<class>/<image> and
DATA/val/<class>/<image>, seen as the kNN monitor sees them (augment.eval_transform).
From a lab: look.main([checkpoint, data, '-o', folder]) -> {figure name: path}.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (the library, from the repository root)
import checkpoint  # noqa: E402
import data  # noqa: E402
import evaluation  # noqa: E402
import launch  # noqa: E402
import vit  # noqa: E402
from launch import UserError  # noqa: E402

import matplotlib  # noqa: E402
matplotlib.use('Agg')                         # files only: works without a screen
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.lines import Line2D  # noqa: E402

KNN_K = 20                                    # the monitor's kNN (evaluation.knn_predict)
SAME, OTHER = 'tab:green', 'tab:red'          # a neighbour's frame: its class matches or not


# ----------------------------------------------------------------------------- the backbones
def load(path, arch=None, weights=True, seed=0):
    """The bare backbone of `path` (every layout checkpoint.load_backbone reads), in eval mode.
    weights=False: the same architecture, initialised afresh from `seed`: the random-init
    baseline the kNN monitor logs as epoch 0."""
    torch.manual_seed(seed)
    return checkpoint.load_backbone(path, arch, weights=weights).eval()


def describe(path, arch, model):
    """-> (a name for the figures, the image size to feed): the file's folder and name, its
    framework and epoch where it records them; the size it was trained at (ours record it; the
    official ViTs are built for theirs; 224 else)."""
    ckpt = checkpoint.read(path)
    name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))),
                        os.path.basename(path))
    facts = [ckpt.get('framework'), ckpt.get('arch') or arch]
    if 'epoch' in ckpt:
        facts.append(f"epoch {ckpt['epoch']}")
    name += ' (' + ', '.join(str(f) for f in facts if f) + ')'
    trained_at = [(ckpt.get('backbone_kwargs') or {}).get('img_size'),
                  (ckpt.get('args') or {}).get('img_size'), getattr(model, 'img_size', None)]
    return name, next((s for s in trained_at if s), 224)


# ----------------------------------------------------------------------------- the features
def image_sets(root, img_size, k):
    """(train, val) of root in the scripts' layout, each image resized and centre-cropped to
    img_size as the kNN monitor sees it."""
    view = augment.eval_transform(img_size)
    train_set, val_set = (data.image_folder(os.path.join(root, s), view) for s in ('train', 'val'))
    data.check_same_classes(train_set, val_set, root)
    if len(train_set) < k:
        raise UserError(f'{root}/train holds {len(train_set)} images, fewer than the '
                        f'{k} neighbours asked for (-k)')
    return train_set, val_set


def look_at(model, name, root, img_size, k, device, workers=0):
    """One network's view of the image set: its train/ and val/ features, their kNN top-1 and the
    images as it sees them -> a dict that the figures draw."""
    if isinstance(model, vit.VisionTransformer) and img_size % model.patch_size:
        raise UserError(f'{name}: image size {img_size} is not a multiple of its patch size '
                        f'{model.patch_size}')
    sets = image_sets(root, img_size, k)
    model.to(device)
    feats = []
    for s in sets:
        loader = torch.utils.data.DataLoader(s, batch_size=128, num_workers=workers)
        feats.append(evaluation.extract_features(model, loader, device))  # (N, D), (N,)
    (train_f, train_l), (val_f, val_l) = feats
    scores = evaluation.knn_predict(train_f, train_l, val_f, len(sets[0].classes), k=KNN_K)
    return dict(model=model, name=name, sets=sets, train=train_f, train_labels=train_l, val=val_f,
                val_labels=val_l, knn_top1=evaluation.accuracy(scores, val_l)[0], device=device)


def pick_queries(labels, n):
    """n indices of val images: the first image of n classes spread evenly over the classes
    (of all, if fewer), then the next images in order."""
    labels = labels.tolist()
    classes = sorted(set(labels))
    chosen = [classes[i * len(classes) // n] for i in range(min(n, len(classes)))]
    picks = [labels.index(c) for c in chosen]
    rest = [i for i in range(len(labels)) if i not in picks]
    return picks + rest[:n - len(picks)]


def neighbours(view, queries, k):
    """The k train/ images nearest to each query, as the kNN monitor ranks them ->
    (cosine similarities (Q, k), train indices (Q, k)), most similar first."""
    return evaluation.knn_neighbours(view['train'], view['val'][queries], k)


@torch.no_grad()
def last_block_attention(model, images):
    """The softmax attention of the last block, (B, 3, H, W) -> (B, h, N, N): row i is token i's
    attention over the N keys (the class token, if any, then the patches, row-major). Recomputed
    from the block's input as vit.Attention computes it (inside scaled_dot_product_attention):
    q, k from attn.qkv of norm1(x), split into h heads of C/h channels, scaled by (C/h)^-1/2."""
    block, seen = model.blocks[-1], {}
    hook = block.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    try:
        model.forward_features(images)
    finally:
        hook.remove()
    x = block.norm1(seen['x'])                                        # (B, N, C)
    B, N, C = x.shape
    h = block.attn.num_heads
    qkv = block.attn.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # (3, B, h, N, C/h)
    q, k = qkv[0], qkv[1]                                             # (B, h, N, C/h) each
    return (q @ k.transpose(-2, -1) * (C // h) ** -0.5).softmax(dim=-1)  # (B, h, N, N)


def pooled_attention(model, images):
    """The attention of the token the feature is read from, (B, 3, H, W) -> (B, h, N), each row
    summing to 1 over the keys: the class token's row (pool='token'); with pool='avg' the feature
    is the patch tokens' mean, so the mean of their rows."""
    attn = last_block_attention(model, images)                        # (B, h, N, N)
    if model.pool == 'token':
        return attn[:, :, 0]
    return attn[:, :, model.num_prefix:].mean(dim=2)


@torch.no_grad()
def patch_tokens(model, images):
    """The patch tokens the feature is pooled from (after the final norm; the class token
    left out): (B, 3, H, W) -> (B, L, D)."""
    seen = {}
    hook = model.norm.register_forward_hook(lambda module, args, out: seen.update(x=out))
    try:
        model.forward_features(images)
    finally:
        hook.remove()
    return seen['x'][:, model.num_prefix:]


def principal_components(x, q):
    """x (M, D) centred and projected on its q principal directions -> ((M, q), the fraction of
    the variance each holds (q,)), largest first. SVD's signs are arbitrary: each column is
    flipped so that its largest magnitude is positive, so a figure does not flip between runs."""
    x = x.float() - x.float().mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)               # vh: (min(M, D), D)
    proj = x @ vh[:q].T                                               # (M, q)
    sign = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True)).sign()
    proj = proj * torch.where(sign == 0, 1.0, sign)
    var = s ** 2
    return proj, var[:q] / var.sum().clamp_min(1e-12)


def pca_colours(tokens):
    """Patch tokens (B, L, D) of several images -> RGB (B, L, 3) in [0, 1]: the first three
    principal components, computed jointly over all the images (a colour means the same in
    each), each scaled to [0, 1] over them all."""
    B, L, D = tokens.shape
    pcs, _ = principal_components(tokens.reshape(B * L, D), 3)        # (B L, 3)
    pcs = torch.cat([pcs, pcs.new_zeros(B * L, 3 - pcs.shape[1])], dim=1)  # fewer than 3 dims
    lo, hi = pcs.min(dim=0).values, pcs.max(dim=0).values
    return ((pcs - lo) / (hi - lo).clamp_min(1e-12)).reshape(B, L, 3)


# ----------------------------------------------------------------------------- the figures
def picture(image):
    """A normalised image (3, H, W) -> (H, W, 3) in [0, 1] to draw: what the network saw."""
    mean, std = (torch.tensor(v)[:, None, None] for v in (augment.IMAGENET_MEAN,
                                                         augment.IMAGENET_STD))
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def blank(ax):
    ax.set_xticks([])
    ax.set_yticks([])


def frame(ax, colour, width=3):
    for spine in ax.spines.values():
        spine.set(color=colour, linewidth=width)


def knn_line(view):
    return f"{view['name']}: kNN top-1 {view['knn_top1']:.1f}% (k={KNN_K})"


def draw_neighbours(views, queries, k):
    """Left: the queries' top-k neighbours for views[0]; right: the same queries for views[1]."""
    cell = 1.0 if k <= 6 else 0.8
    width = max(2 * (k + 1) * cell + 0.8, 8.0)                       # room for the titles
    fig = plt.figure(figsize=(width, len(queries) * cell + 1.4), layout='constrained')
    panels = fig.subfigures(1, 2, wspace=0.04)
    for panel, view in zip(panels, views):
        train_set, val_set = view['sets']
        sim, idx = neighbours(view, queries, k)                       # (Q, k) each
        axes = panel.subplots(len(queries), k + 1, squeeze=False)
        for row, q in enumerate(queries):
            label = view['val_labels'][q].item()
            ax = axes[row, 0]
            ax.imshow(picture(val_set[q][0]))
            ax.set_ylabel(val_set.classes[label], fontsize=9)
            frame(ax, 'black', 1)
            for col in range(k):
                j = idx[row, col].item()
                ax = axes[row, col + 1]
                ax.imshow(picture(train_set[j][0]))
                # 3 decimals: features that share a large mean sit in a narrow cone
                ax.set_xlabel(f'{sim[row, col]:.3f}', fontsize=8, labelpad=3)
                frame(ax, SAME if view['train_labels'][j].item() == label else OTHER)
        for ax in axes.flat:
            blank(ax)
        axes[0, 0].set_title('query', fontsize=9)
        for col in range(k):
            axes[0, col + 1].set_title(f'#{col + 1}', fontsize=9)
        name = view['name']                                           # ~11 characters an inch
        if len(name) > 5.5 * width:
            name = name.replace(' (', '\n(', 1)
        panel.suptitle(f"{name}\nkNN top-1 {view['knn_top1']:.1f}% (k={KNN_K})", fontsize=10)
    fig.suptitle(f'Top-{k} neighbours in train/ of val/ queries by cosine similarity (the kNN '
                 'monitor\'s)\nframe: green = same class, red = another; number: the similarity',
                 fontsize=11)
    return fig


def draw_feature_space(views):
    """The val features of each view, L2-normalised as the kNN monitor compares them, on their own
    first two principal components."""
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 5.6), squeeze=False,
                             layout='constrained')
    classes = views[0]['sets'][1].classes
    cmap = plt.get_cmap('tab10' if len(classes) <= 10 else 'tab20' if len(classes) <= 20
                        else 'turbo', len(classes))
    for ax, view in zip(axes[0], views):
        unit = torch.nn.functional.normalize(view['val'], dim=1)      # (N, D)
        xy, frac = principal_components(unit, 2)                      # (N, 2), (2,)
        labels = view['val_labels'].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=-0.5,
                   vmax=len(classes) - 0.5, s=8, alpha=0.8, linewidths=0)
        ax.set(xlabel=f'PC 1 ({100 * frac[0]:.0f}% of the variance)',
               ylabel=f'PC 2 ({100 * frac[1]:.0f}%)', xticks=[], yticks=[])
        ax.set_title(f"{view['name']}\nkNN top-1 {view['knn_top1']:.1f}% (k={KNN_K})",
                     fontsize=9)
    if len(classes) <= 20:
        keys = [Line2D([], [], ls='', marker='o', color=cmap(i), label=c)
                for i, c in enumerate(classes)]
        fig.legend(handles=keys, loc='outside lower center', ncol=min(len(classes), 10),
                   fontsize=8, frameon=False)
    fig.suptitle('val/ features (L2-normalised, as the kNN monitor compares them) on their first '
                 f'two principal components, coloured by class ({len(classes)} classes)',
                 fontsize=10)
    return fig


def query_images(view, queries):
    images = torch.stack([view['sets'][1][q][0] for q in queries])    # (B, 3, H, W)
    return images.to(view['device'])


def draw_attention(view, queries):
    """Per image: the image, the heads' mean, each head; each map its own colour scale."""
    model = view['model']
    images = query_images(view, queries)
    attn = pooled_attention(model, images)[:, :, model.num_prefix:]   # (B, h, L): the patches
    g = images.shape[-1] // model.patch_size
    maps = attn.reshape(*attn.shape[:2], g, g).cpu()                  # (B, h, g, g)
    heads = maps.shape[1]
    cell = 1.1
    fig, axes = plt.subplots(len(queries), heads + 2, squeeze=False,
                             figsize=((heads + 2) * cell, len(queries) * cell + 0.8),
                             layout='constrained')
    for row in range(len(queries)):
        axes[row, 0].imshow(picture(images[row]))
        panels = [maps[row].mean(dim=0)] + list(maps[row])
        for col, m in enumerate(panels):
            axes[row, col + 1].imshow(m, cmap='inferno', interpolation='nearest')
    for ax in axes.flat:
        blank(ax)
    for col, title in enumerate(['image', 'mean'] + [f'head {i + 1}' for i in range(heads)]):
        axes[0, col].set_title(title, fontsize=8)
    who = "the class token's" if model.pool == 'token' else "the mean token's"
    why = ("pool='avg': the feature is the patch tokens' mean, so the mean of their rows\n"
           if model.pool == 'avg' else '')
    fig.suptitle(f'Last block: {who} attention to the {g}x{g} patches, per head (own colour '
                 f'scale)\n{why}{knn_line(view)}', fontsize=9)
    return fig


def draw_patch_pca(view, queries):
    """The images above their patch tokens' first three principal components as RGB."""
    model = view['model']
    images = query_images(view, queries)
    rgb = pca_colours(patch_tokens(model, images)).cpu()              # (B, L, 3)
    g = images.shape[-1] // model.patch_size
    fig, axes = plt.subplots(2, len(queries), squeeze=False,
                             figsize=(1.4 * len(queries) + 0.4, 3.6), layout='constrained')
    for col in range(len(queries)):
        axes[0, col].imshow(picture(images[col]))
        axes[1, col].imshow(rgb[col].reshape(g, g, 3).numpy(), interpolation='nearest')
    for ax in axes.flat:
        blank(ax)
    axes[0, 0].set_ylabel('image', fontsize=8)
    axes[1, 0].set_ylabel('PC 1-3 as RGB', fontsize=8)
    fig.suptitle(f'Patch tokens: first 3 principal components (joint over these '
                 f'{len(queries)} images) as RGB, {g}x{g} patches\n{knn_line(view)}', fontsize=9)
    return fig


# ----------------------------------------------------------------------------- the entry point
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('checkpoint', metavar='CHECKPOINT', help='any checkpoint the scripts read')
    p.add_argument('data', metavar='DATA', nargs='?',
                   help='DATA/train/<class>/<image>, DATA/val/<class>/<image> '
                        f'(default: the built-in demo images, {data.DEMO_ROOT})')
    p.add_argument('-o', '--out', help='folder of the PNGs (default: CHECKPOINT\'s folder/look)')
    p.add_argument('-k', type=int, default=5, help='neighbours drawn per query')
    p.add_argument('--queries', type=int, default=8, help='val images drawn (rows)')
    p.add_argument('--compare', metavar='CKPT2',
                   help='draw this checkpoint beside CHECKPOINT instead of the random init')
    p.add_argument('--arch', help="CHECKPOINT's, if it records none (a bare backbone)")
    p.add_argument('--compare-arch', help="CKPT2's, if it records none")
    p.add_argument('--img-size', type=int,
                   help='the images fed (default: the size each checkpoint was trained at)')
    p.add_argument('--seed', type=int, default=0, help='of the random initialisation')
    p.add_argument('-j', '--workers', type=int, default=0, help='image loading processes')
    return p.parse_args(argv)


def views_of(args):
    """The two networks drawn, each seeing the images at its own size: CHECKPOINT's, and beside it
    --compare's or CHECKPOINT's architecture at random initialisation."""
    if args.k < 1 or args.queries < 1:
        raise UserError('-k and --queries must be at least 1')
    if args.data is None:                                    # the built-in set, made once
        args.data = data.build_demo_dataset(os.path.join(ROOT, data.DEMO_ROOT))
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = load(args.checkpoint, args.arch)
    name, img_size = describe(args.checkpoint, args.arch, model)
    if args.compare:
        other = load(args.compare, args.compare_arch)
        other_name, other_size = describe(args.compare, args.compare_arch, other)
    else:
        other = load(args.checkpoint, args.arch, weights=False, seed=args.seed)
        other_name, other_size = f'random init (seed {args.seed}), same arch', img_size
    return [look_at(m, n, args.data, args.img_size or size, args.k, device, args.workers)
            for m, n, size in ((model, name, img_size), (other, other_name, other_size))]


def main(argv=None):
    """Writes the figures of the checkpoint -> {figure name: path of its PNG}."""
    args = parse_args(argv)
    views = views_of(args)
    model, name = views[0]['model'], views[0]['name']
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), 'look')
    for view in views:
        print(knn_line(view))
    queries = pick_queries(views[0]['val_labels'], args.queries)

    figures = {'neighbours': lambda: draw_neighbours(views, queries, args.k),
               'feature_space': lambda: draw_feature_space(views)}
    if isinstance(model, vit.VisionTransformer):
        few = queries[:6]                                   # rows that stay legible
        figures['attention'] = lambda: draw_attention(views[0], few[:4])
        figures['patch_pca'] = lambda: draw_patch_pca(views[0], few)
    else:
        print(f'{name}: a ResNet: neighbours and feature space only (attention and patch '
              'maps need a ViT\'s tokens)')
    os.makedirs(out, exist_ok=True)
    written = {}
    for figure, draw in figures.items():
        fig = draw()
        written[figure] = os.path.join(out, f'{figure}.png')
        fig.savefig(written[figure], dpi=110, bbox_inches='tight')
        plt.close(fig)
        print(written[figure])
    return written


if __name__ == '__main__':
    launch.exit_on_user_error(main)

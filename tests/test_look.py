"""labs/look.py: the numbers behind its pictures. The neighbours drawn are the ones the kNN monitor
votes with; the attention maps are the softmax rows of the last block's class token (a tiny ViT's,
computed by hand); the patch colours are the top principal components; the random-init panel has
weights of its own; bad input is one line and exit 1; a run writes its four PNGs, at 32 px and at
224 px in the official release's layout."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('matplotlib')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'labs'))
import look  # noqa: E402  (first: it picks the Agg backend)
import matplotlib.pyplot as plt  # noqa: E402

import data  # noqa: E402
import evaluation  # noqa: E402
import moco  # noqa: E402
import launch  # noqa: E402

PNG = b'\x89PNG\r\n\x1a\n'
TINY = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
CPU = torch.device('cpu')


def tiny_vit(**kw):
    return moco.ARCHS['vit_tiny'](**{**TINY, **kw}, num_classes=0)


def trained(model, seed=1):
    """The model with every weight moved off its initialisation, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def save_ours(model, path, **kwargs):
    """Our layout: MoCo keys (the backbone under base_encoder.), arch and backbone_kwargs."""
    state = {f'base_encoder.{k}': v for k, v in model.state_dict().items()}
    torch.save({'state_dict': state, 'arch': 'vit_tiny', 'backbone_kwargs': kwargs,
                'framework': 'mocov3', 'epoch': 3}, path)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A 10-class set of 6 train and 3 val images per class, two tiny ViT checkpoints."""
    tmp = tmp_path_factory.mktemp('look')
    root = data.build_demo_dataset(str(tmp / 'shapes'), 6, 3)
    torch.manual_seed(0)
    ckpt = save_ours(trained(tiny_vit()), tmp / 'vit.pth', **TINY)
    other = save_ours(trained(tiny_vit(), seed=2), tmp / 'other.pth', **TINY)
    return dict(root=root, ckpt=ckpt, other=other, tmp=tmp)


@pytest.fixture(scope='module')
def views(files):
    return look.views_of(look.parse_args([files['ckpt'], files['root'], '-k', '4']))


def test_neighbours_drawn_are_those_knn_predict_votes_with(views):
    view, k = views[0], 4
    model = view['model']
    train_set, val_set = view['sets']
    # the features by hand: every image through forward_features
    with torch.no_grad():                         # on the device look.py chose (a GPU if any)
        train_f = model.forward_features(torch.stack([x for x, _ in train_set]).to(view['device']))
        val_f = model.forward_features(torch.stack([x for x, _ in val_set]).to(view['device']))
    train_f, val_f = train_f.cpu(), val_f.cpu()                                     # (60|30, D)
    train_l = torch.tensor(train_set.targets)
    assert torch.allclose(view['train'], train_f, atol=1e-5)
    assert torch.allclose(view['val'], val_f, atol=1e-5)
    sim = F.normalize(val_f, dim=1) @ F.normalize(train_f, dim=1).T                 # (30, 60)
    want_sim, want_idx = sim.topk(k, dim=1)

    queries = look.pick_queries(view['val_labels'], 5)
    got_sim, got_idx = look.neighbours(view, queries, k)
    assert torch.equal(got_idx, want_idx[queries])
    assert torch.allclose(got_sim, want_sim[queries], atol=1e-5)
    # knn_predict's votes are exp(sim / T) of exactly these neighbours
    votes = torch.zeros(len(queries), 10).scatter_add_(1, train_l[want_idx[queries]],
                                                       (want_sim[queries] / 0.07).exp())
    scores = evaluation.knn_predict(view['train'], view['train_labels'], view['val'][queries],
                                    10, k=k)
    assert torch.allclose(scores, votes, rtol=1e-4)
    # the top-1 in the titles: the monitor's 20-NN on these features
    top20 = sim.topk(20, dim=1)
    votes = torch.zeros(30, 10).scatter_add_(1, train_l[top20.indices], (top20.values / 0.07).exp())
    hits = (votes.argmax(dim=1) == torch.tensor(val_set.targets)).float().mean().item()
    assert view['knn_top1'] == pytest.approx(100 * hits)

    # the figure: each row shows its query, then the train images of want_idx, framed by class
    fig = look.draw_neighbours(views, queries, k)
    grid = [ax for ax in fig.subfigs[0].axes]                       # row-major, k + 1 a row
    for row, q in enumerate(queries):
        axes = grid[row * (k + 1):(row + 1) * (k + 1)]
        assert (axes[0].images[0].get_array() == look.picture(val_set[q][0])).all()
        for col, j in enumerate(want_idx[q].tolist()):
            assert (axes[col + 1].images[0].get_array() == look.picture(train_set[j][0])).all()
            same = train_set.targets[j] == val_set.targets[q]
            colour = axes[col + 1].spines['top'].get_edgecolor()
            assert colour == plt.matplotlib.colors.to_rgba(look.SAME if same else look.OTHER)
            assert axes[col + 1].get_xlabel() == f'{want_sim[q, col]:.3f}'
    plt.close(fig)


def hand_attention(model, images):
    """The last (only) block's attention, from the weights: (B, h, N, N), and the feature it
    leads to (B, D), computed without vit.py's forward."""
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)                # (B, L, C)
    B, L, C = x.shape
    if model.cls_token is not None:
        x = torch.cat([model.cls_token.expand(B, 1, C), x], dim=1)
    x = x + model.pos_embed                                                        # (B, N, C)
    blk = model.blocks[0]
    h, N = blk.attn.num_heads, x.shape[1]
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    w, b = blk.attn.qkv.weight, blk.attn.qkv.bias                                  # (3C, C)
    q, k, v = (F.linear(y, w[i * C:(i + 1) * C], b[i * C:(i + 1) * C]) for i in range(3))
    q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))     # (B, h, N, C/h)
    attn = torch.exp(q @ k.transpose(-2, -1) / (C // h) ** 0.5)
    attn = attn / attn.sum(dim=-1, keepdim=True)                                   # (B, h, N, N)
    x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    x = model.norm(x + blk.mlp(blk.norm2(x)))
    feature = x[:, 0] if model.pool == 'token' else x[:, model.num_prefix:].mean(dim=1)
    return attn, feature


@pytest.mark.parametrize('pool', ['token', 'avg'])
@torch.no_grad()
def test_attention_is_the_softmax_row_of_the_pooled_token(pool):
    torch.manual_seed(0)
    kw = dict(pool='avg', class_token=False) if pool == 'avg' else {}
    model = trained(tiny_vit(**kw)).eval()
    images = torch.randn(3, 3, 32, 32)
    attn, feature = hand_attention(model, images)
    # the hand-made attention is the model's: it reproduces the model's feature
    assert torch.allclose(feature, model.forward_features(images), atol=1e-5)
    assert torch.allclose(look.last_block_attention(model, images), attn, atol=1e-6)
    got = look.pooled_attention(model, images)                                      # (B, h, N)
    want = attn[:, :, 0] if pool == 'token' else attn.mean(dim=2)
    assert got.shape == (3, 2, 16 + model.num_prefix)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.sum(dim=-1), torch.ones(3, 2), atol=1e-6)


def test_pca_colours_are_the_top_components():
    """Tokens made of three known directions of decreasing spread: colour channel i follows
    coefficient i, spanning [0, 1] over all the images jointly."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q[:, :3].T            # (3, 16)
    # coefficients centred and uncorrelated (orthogonal columns): the principal directions are
    # exactly the basis, in this order
    coef = torch.randn(3 * 25, 3, generator=g)
    coef = torch.linalg.qr(coef - coef.mean(dim=0)).Q * torch.tensor([10.0, 4.0, 1.5])  # (M, 3)
    tokens = coef @ basis + 1e-3 * torch.randn(3 * 25, 16, generator=g)            # (M, 16)
    rgb = look.pca_colours(tokens.reshape(3, 25, 16)).reshape(-1, 3)              # (M, 3)
    for i in range(3):
        r = torch.corrcoef(torch.stack([rgb[:, i], coef[:, i]]))[0, 1]
        assert abs(r) > 0.999, (i, r)
    assert torch.allclose(rgb.min(dim=0).values, torch.zeros(3))
    assert torch.allclose(rgb.max(dim=0).values, torch.ones(3))
    _, frac = look.principal_components(tokens, 3)
    assert frac[0] > frac[1] > frac[2] and frac.sum() > 0.999


def test_random_init_panel_has_weights_of_its_own(files, views):
    saved = torch.load(files['ckpt'], weights_only=True)['state_dict']
    fresh = {k: v.cpu() for k, v in views[1]['model'].state_dict().items()}
    assert views[1]['name'].startswith('random init (seed 0)')
    # every weight of the checkpoint was moved off any initialisation: none is the panel's
    for key, value in fresh.items():
        assert not torch.allclose(value, saved[f'base_encoder.{key}']), key
    # ... and they are the seeded initialisation of the same architecture
    torch.manual_seed(0)
    assert all(torch.equal(v, fresh[k]) for k, v in tiny_vit().state_dict().items())
    assert not torch.allclose(views[0]['val'], views[1]['val'])


def test_compare_draws_the_second_checkpoint(files):
    views = look.views_of(look.parse_args([files['ckpt'], files['root'], '--compare',
                                           files['other'], '-k', '2']))
    other = torch.load(files['other'], weights_only=True)['state_dict']
    assert views[1]['name'].startswith(os.path.join(os.path.basename(files['tmp']), 'other.pth'))
    assert all(torch.equal(v.cpu(), other[f'base_encoder.{k}'])
               for k, v in views[1]['model'].state_dict().items())


def test_end_to_end_writes_the_figures(files, capsys):
    written = look.main([files['ckpt'], files['root'], '-o', str(files['tmp'] / 'out'),
                         '-k', '3', '--queries', '4'])
    assert set(written) == {'neighbours', 'feature_space', 'attention', 'patch_pca'}
    for path in written.values():
        assert open(path, 'rb').read(8) == PNG
    lines = capsys.readouterr().out.splitlines()
    assert 'vit.pth (mocov3, vit_tiny, epoch 3): kNN top-1' in lines[0]


def test_official_layouts_vit_small_at_224_and_resnet50(tmp_path, capsys):
    """The release's layout: 'module.base_encoder.*' beside the momentum encoder and predictor,
    'arch', no backbone_kwargs: ViT-S is rebuilt at its 224 px, 14 x 14 patches of 16, 12 heads."""
    root = data.build_demo_dataset(str(tmp_path / 'shapes'), 1, 1)
    for arch in ('vit_small', 'resnet50'):
        torch.manual_seed(0)
        backbone = moco.ARCHS[arch](num_classes=0)
        state = {f'module.{enc}.{k}': v for k, v in backbone.state_dict().items()
                 for enc in ('base_encoder', 'momentum_encoder')}
        state['module.predictor.0.weight'] = torch.zeros(4, 4)
        torch.save({'state_dict': state, 'arch': arch, 'epoch': 300}, tmp_path / f'{arch}.pth')
    path = str(tmp_path / 'vit_small.pth')
    model = look.load(path)
    name, img_size = look.describe(path, None, model)
    assert (name, img_size) == (f'{tmp_path.name}/vit_small.pth (vit_small, epoch 300)', 224)
    view = look.look_at(model, name, root, img_size, 2, CPU)
    images = look.query_images(view, [0, 1])
    assert images.shape == (2, 3, 224, 224)
    assert look.pooled_attention(model, images).shape == (2, 12, 1 + 14 * 14)
    fig = look.draw_attention(view, [0, 1])
    assert len(fig.axes) == 2 * (12 + 2)
    plt.close(fig)
    # a ResNet: neighbours and feature space only, said in one line (at 32 px: seconds)
    written = look.main([str(tmp_path / 'resnet50.pth'), root, '-k', '2', '--queries', '2',
                         '--img-size', '32', '-o', str(tmp_path / 'out')])
    assert set(written) == {'neighbours', 'feature_space'}
    assert sum('neighbours and feature space only' in line
               for line in capsys.readouterr().out.splitlines()) == 1


BAD = {'no checkpoint': lambda f, tmp: [str(tmp / 'missing.pth'), f['root']],
       'no data': lambda f, tmp: [f['ckpt'], str(tmp / 'nowhere')],
       'other arch': lambda f, tmp: [str(tmp / 'bare.pth'), f['root'], '--arch', 'resnet18'],
       'img size': lambda f, tmp: [f['ckpt'], f['root'], '--img-size', '36'],
       'fewer than k': lambda f, tmp: [f['ckpt'], f['root'], '-k', '61']}


@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_one_line_and_exit_1(files, tmp_path, capsys, case):
    """As the script's last line runs it: launch.exit_on_user_error(main)."""
    torch.save(tiny_vit().state_dict(), tmp_path / 'bare.pth')   # a bare ViT: no arch recorded
    argv = BAD[case](files, tmp_path) + ['-o', str(tmp_path / 'out')]
    with pytest.raises(SystemExit) as exit:
        launch.exit_on_user_error(lambda: look.main(argv))
    assert exit.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    assert not os.path.exists(tmp_path / 'out')


def test_the_script_says_one_line_and_exits_1(files, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'labs', 'look.py'), files['ckpt'],
                        files['root'], '-k', '61'], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr == (f"error: {files['root']}/train holds 60 images, fewer than the 61 "
                        "neighbours asked for (-k)\n")

"""Tests of the data layer: augment.py (the pretraining augmentations, PIL's blur),
data.py (the built-in demo set, one-line errors for unreadable images) and evaluation.py's kNN,
on hand-made inputs."""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402
import data  # noqa: E402
import evaluation  # noqa: E402


def test_augmentations():
    aug1, aug2 = augment.pretrain_transforms(224, 0.08)
    for aug, blur_p, solarize_p in ((aug1, 1.0, None), (aug2, 0.1, 0.2)):
        t = {type(op).__name__: op for op in aug.transforms}
        assert (tuple(t['RandomResizedCrop'].size) == (224, 224)
                and t['RandomResizedCrop'].scale == (0.08, 1.0))
        jitter, blur = [op for op in aug.transforms if type(op).__name__ == 'RandomApply']
        cj = jitter.transforms[0]
        assert jitter.p == 0.8 and (cj.brightness, cj.contrast, cj.saturation, cj.hue) == \
            ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        assert t['RandomGrayscale'].p == 0.2
        assert blur.p == blur_p and isinstance(blur.transforms[0], augment.GaussianBlur)
        assert blur.transforms[0].sigma == (0.1, 2.0) and blur.transforms[0].scale == 1.0
        if solarize_p is None:
            assert 'RandomSolarize' not in t
        else:
            assert t['RandomSolarize'].p == solarize_p and t['RandomSolarize'].threshold == 128
        assert t['RandomHorizontalFlip'].p == 0.5
        assert (tuple(t['Normalize'].mean) == augment.IMAGENET_MEAN
                and tuple(t['Normalize'].std) == augment.IMAGENET_STD)
    small = augment.pretrain_transforms(32, 0.2)[0].transforms[3].transforms[0]
    assert small.scale == 32 / 224  # the same blur relative to the crop
    x = augment.TwoCrops(aug1, aug2)(Image.new('RGB', (300, 200), (255, 0, 0)))
    assert [v.shape for v in x] == [(3, 224, 224)] * 2 and x[0].dtype == torch.float32


def test_blur_is_pils_gaussian_with_sigma_from_torch_rng():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 50, 3), dtype=np.uint8))
    torch.manual_seed(3)
    sigma = torch.empty(()).uniform_(0.1, 2.0).item()
    torch.manual_seed(3)
    out = augment.GaussianBlur((0.1, 2.0))(img)
    assert out.size == img.size and 0.1 <= sigma <= 2.0
    assert np.array_equal(np.asarray(out),
                          np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))
    assert not np.array_equal(np.asarray(out), np.asarray(img))
    half = augment.GaussianBlur((1.0, 1.0), scale=0.5)(img)               # scale multiplies sigma
    assert np.array_equal(np.asarray(half),
                          np.asarray(img.filter(ImageFilter.GaussianBlur(radius=0.5))))


def test_knn_predict_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[3.0, 0.0]])                         # cosine 1, 0, 0.6, -1 with the four
    scores = evaluation.knn_predict(train, labels, query, num_classes=3, k=2, T=0.5)
    assert torch.allclose(scores, torch.tensor([[math.exp(2.0), math.exp(1.2), 0.0]]))


def test_demo_dataset_is_deterministic(tmp_path):
    root = data.build_demo_dataset(str(tmp_path / 'demo'), train=2, val=1)  # the smoke-test size
    assert sorted(os.listdir(os.path.join(root, 'train'))) == sorted(data.DEMO_CLASSES)
    assert len(os.listdir(os.path.join(root, 'val', 'star'))) == 1
    assert len(os.listdir(os.path.join(root, 'train', 'star'))) == 2
    assert open(os.path.join(root, 'VERSION')).read().split() == [data.DEMO_VERSION, '2+1']
    first = open(os.path.join(root, 'train', 'star', '0001.png'), 'rb').read()
    assert data.build_demo_dataset(root, train=2, val=1) == root  # found: not generated again
    again = data.build_demo_dataset(str(tmp_path / 'again'), train=3, val=1)
    # the same first images at any size: the smoke set is the start of the full one
    assert open(os.path.join(again, 'train', 'star', '0001.png'), 'rb').read() == first


def test_demo_images_carry_no_colour_cue():
    """Black and white only (grey at anti-aliased edges), both ways round in every class:
    the colours can neither classify an image nor tell it from the others, so what contrastive
    learning finds is shape."""
    for name in data.DEMO_CLASSES:
        backgrounds = set()
        for seed in range(12):
            img = np.asarray(data._demo_image(name, seed)).astype(int)
            # grey levels
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
            counts = np.bincount(img[..., 0].ravel(), minlength=256)
            assert (counts[0] + counts[255] > 0.7 * img[..., 0].size
                    and counts[0] > 0 and counts[255] > 0)
            backgrounds.add(int(img[0, 0, 0]))                 # a corner: no shape reaches it
        assert backgrounds == {0, 255}, name


def test_unreadable_image_and_missing_folders_are_one_line(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    (tmp_path / 'train' / 'a' / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(data.UnreadableImage, match='broken.png') as e:
        data.image_folder(str(tmp_path / 'train'), None)[0]
    assert isinstance(e.value, ValueError) and '\n' not in str(e.value)
    with pytest.raises(ValueError, match='no folder'):
        data.image_folder(str(tmp_path / 'nowhere'), None)
    (tmp_path / 'empty' / 'a').mkdir(parents=True)
    with pytest.raises(ValueError, match='no images'):
        data.image_folder(str(tmp_path / 'empty'), None)


def test_eval_transform_is_resize_then_centre_crop():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 80, 3), dtype=np.uint8))
    for bicubic, mode in ((False, Image.BILINEAR), (True, Image.BICUBIC)):
        # short side 60 -> 32 (80 -> 42), crop 28
        x = augment.eval_transform(28, bicubic=bicubic)(img)
        ref = img.resize((42, 32), mode).crop((7, 2, 35, 30))
        ref = ((torch.from_numpy(np.asarray(ref)).permute(2, 0, 1).float() / 255
                - torch.tensor(augment.IMAGENET_MEAN)[:, None, None])
               / torch.tensor(augment.IMAGENET_STD)[:, None, None])
        assert x.shape == (3, 28, 28)
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)  # on PIL images: PIL itself

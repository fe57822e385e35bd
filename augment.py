"""Augmentations of each stage of MoCo v3 (Chen, Xie, He, ICCV 2021), on PIL images -> normalised
tensors.

  pretraining     BYOL's asymmetric two-crop augmentation, as the official main_moco.py ...
  pretrain_transforms
  evaluation      resize to img_size * 256/224, centre crop: kNN, linear probing, fine-tuning .
  eval_transform linear probing  RandomResizedCrop + flip, as the official main_lincls.py
  .............. linear_transform
  fine-tuning     DeiT's recipe: crop, flip, RandAugment, random erasing; MixUp/CutMix on
                  batches ........................................... finetune_transform,
                  batch_mixer
Inputs are normalised with ImageNet's statistics, as in the official code (also for the demo data).
"""
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_normalized_tensor():
    """PIL image -> float32 (3, H, W) in [0, 1] -> normalised with ImageNet's mean and std."""
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


# ----------------------------------------------------------------------------- pretraining
class GaussianBlur:
    """Gaussian blur of a PIL image, sigma ~ U[0.1, 2.0] px: PIL's
    ImageFilter.GaussianBlur(radius=sigma), the op the official MoCo v3 applies. It is 7x faster
    than torchvision's 23-tap kernel blur at 224 px (an extended box filter, whose cost does not
    grow with sigma; `bench.py --data`). sigma is drawn from torch's RNG, as the torchvision ops
    around it, and multiplied by `scale` (img_size / 224 in pretrain_transforms: the same blur
    relative to the crop at any size, the paper's at 224)."""

    def __init__(self, sigma=(0.1, 2.0), scale=1.0):
        self.sigma, self.scale = sigma, scale

    def __call__(self, img):
        sigma = self.scale * torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self):
        return f'GaussianBlur(sigma={self.sigma}, scale={self.scale:g})'


def pretrain_transforms(img_size, crop_min):
    """BYOL's asymmetric augmentations (Grill et al. 2020), as in the official MoCo v3: crop 1 is
    always blurred, crop 2 rarely blurred and sometimes solarized. torchvision v2 ops on PIL images
    (measured faster here than on uint8 tensors: ColorJitter's hue costs more on tensors), and PIL's
    blur."""
    def crop(blur_p, solarize_p):
        ops = [v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True),
               v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
               v2.RandomGrayscale(p=0.2),
               v2.RandomApply([GaussianBlur((0.1, 2.0), scale=img_size / 224)], p=blur_p)]
        if solarize_p > 0:
            ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        return v2.Compose(ops + [v2.RandomHorizontalFlip(), *to_normalized_tensor()])
    return crop(1.0, 0.0), crop(0.1, 0.2)


class TwoCrops:
    """Two differently augmented views of one image: the positive pair of the contrastive loss."""

    def __init__(self, aug1, aug2):
        self.aug1, self.aug2 = aug1, aug2

    def __call__(self, img):
        return [self.aug1(img), self.aug2(img)]


# --------------------------------------------------------------------- evaluation, linear probing
def eval_transform(img_size, bicubic=False):
    """Resize the short side to img_size * 256/224, centre crop img_size: the usual evaluation view
    (256 -> 224 at the paper's size). Bilinear as the official main_lincls.py; bicubic as DeiT's
    fine-tuning."""
    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    return v2.Compose([v2.Resize(int(img_size * 256 / 224), interpolation=mode, antialias=True),
                       v2.CenterCrop(img_size), *to_normalized_tensor()])


def linear_transform(img_size):
    """The official main_lincls.py training view: RandomResizedCrop (scale 0.08-1) and a flip."""
    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(),
                       *to_normalized_tensor()])


# ----------------------------------------------------------------------------- fine-tuning (DeiT)
def finetune_transform(img_size, crop_min=0.08, ra_num_ops=2, ra_magnitude=9, ra_mstd=0.5,
                       reprob=0.25, bicubic=True):
    """DeiT's per-image augmentation (its timm create_transform): RandomResizedCrop, flip,
    RandAugment 'rand-m9-mstd0.5-inc1' (ra_num_ops=0: none), normalise, random erasing with
    per-pixel normal noise (timm's mode 'pixel'). Bicubic as DeiT; the official transfer recipe is
    bilinear, crop_min 0.05, no RandAugment and no erasing (its transfer/datasets.py builds exactly
    crop + flip)."""
    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    ops = [v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), interpolation=mode,
                                antialias=True),
           v2.RandomHorizontalFlip()]
    if ra_num_ops > 0:
        ops.append(RandAugment(ra_num_ops, ra_magnitude, ra_mstd, bicubic=bicubic))
    ops += to_normalized_tensor()
    if reprob > 0:
        ops.append(v2.RandomErasing(reprob, value='random'))
    return v2.Compose(ops)


def batch_mixer(mixup, cutmix, num_classes):
    """MixUp or CutMix, one of them per batch with equal odds (DeiT: mixup-switch-prob 0.5). Images
    (B, 3, H, W), labels (B,) -> mixed images and soft targets (B, C) whose rows sum to 1; None if
    both off."""
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return v2.RandomChoice(ops) if ops else None


# ------------------------------------------------------------------- RandAugment, as timm and DeiT
# DeiT's 'rand-m9-mstd0.5-inc1' (Cubuk et al. 2020, in timm's variant): 2 ops drawn with replacement
# from the 15 below, each applied with probability 0.5, at a magnitude m ~ N(9, 0.5) clipped to [0,
# 10]. The 'inc1' set makes every op stronger as m grows (Posterize keeps fewer bits, Solarize a
# lower threshold, the enhancements move away from 1). Each entry: m -> the op's argument (None: the
# op has none), whether the argument gets a random sign, and the op on a PIL image. The ranges are
# timm's auto_augment.py; the code is ours, on PIL.
def _lut(img, f):
    """Apply f to every 0-255 value of every band."""
    return img.point([f(i) for i in range(256)] * len(img.getbands()))


def _affine(img, matrix, fill, resample):
    """PIL's affine: output pixel (x, y) takes the input at (a x + b y + c, d x + e y + f)."""
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


RAND_OPS = {
    'AutoContrast': (None, False, lambda img, v, fill, rs: ImageOps.autocontrast(img)),
    'Equalize': (None, False, lambda img, v, fill, rs: ImageOps.equalize(img)),
    'Invert': (None, False, lambda img, v, fill, rs: ImageOps.invert(img)),
    'Rotate': (lambda m: m / 10 * 30, True,                              # degrees, [-30, 30]
               lambda img, v, fill, rs: img.rotate(v, resample=rs, fillcolor=fill)),
    'PosterizeIncreasing': (lambda m: 4 - int(m / 10 * 4), False,         # bits kept, 4 down to 0
                            lambda img, v, fill, rs: _lut(img,
                                                          lambda i: i & (0xFF << (8 - v)) & 0xFF)),
    'SolarizeIncreasing': (lambda m: 256 - int(m / 10 * 256), False,      # threshold, 256 down to 0
                           lambda img, v, fill, rs: _lut(img, lambda i: 255 - i if i >= v else i)),
    'SolarizeAdd': (lambda m: int(m / 10 * 110), False,  # added below 128, 0 to 110
                    lambda img, v, fill, rs: _lut(img,
                                                  lambda i: min(255, i + v) if i < 128 else i)),
    'ColorIncreasing': (lambda m: m / 10 * 0.9, True,  # enhance factor 1 +- v, [0.1, 1.9]
                        lambda img, v, fill, rs: ImageEnhance.Color(img).enhance(1 + v)),
    'ContrastIncreasing': (lambda m: m / 10 * 0.9, True,
                           lambda img, v, fill, rs: ImageEnhance.Contrast(img).enhance(1 + v)),
    'BrightnessIncreasing': (lambda m: m / 10 * 0.9, True,
                             lambda img, v, fill, rs: ImageEnhance.Brightness(img).enhance(1 + v)),
    'SharpnessIncreasing': (lambda m: m / 10 * 0.9, True,
                            lambda img, v, fill, rs: ImageEnhance.Sharpness(img).enhance(1 + v)),
    'ShearX': (lambda m: m / 10 * 0.3, True,  # shear factor, [-0.3, 0.3]
               lambda img, v, fill, rs: _affine(img, (1, v, 0, 0, 1, 0), fill, rs)),
    'ShearY': (lambda m: m / 10 * 0.3, True,
               lambda img, v, fill, rs: _affine(img, (1, 0, 0, v, 1, 0), fill, rs)),
    'TranslateXRel': (lambda m: m / 10 * 0.45, True,  # fraction of the width, [-0.45, 0.45]
                      lambda img, v, fill, rs: _affine(img, (1, 0, v * img.width, 0, 1, 0),
                                                       fill, rs)),
    'TranslateYRel': (lambda m: m / 10 * 0.45, True,
                      lambda img, v, fill, rs: _affine(img, (1, 0, 0, 0, 1, v * img.height),
                                                       fill, rs)),
}


class RandAugment:
    """timm's RandAugment with the 'inc1' ops on PIL images; every random draw comes from torch's
    RNG, so seeding torch (per epoch, per loader worker) makes it deterministic. Areas that an op
    moves into the image are filled with the ImageNet mean colour (124, 116, 104), as timm;
    geometric ops resample bicubic as DeiT (its --train-interpolation), or bilinear."""

    def __init__(self, num_ops=2, magnitude=9, magnitude_std=0.5, prob=0.5, bicubic=True):
        self.num_ops, self.magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.prob = prob
        self.fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        self.resample = Image.BICUBIC if bicubic else Image.BILINEAR

    def draw(self):
        """The random choices for one image -> [(op name, argument)] of the ops that apply."""
        names, chosen = list(RAND_OPS), []
        for i in torch.randint(len(names), (self.num_ops,)).tolist():  # with replacement, as timm
            if torch.rand(()).item() > self.prob:  # skipped, as timm: P = 1 - prob
                continue
            m = self.magnitude
            if self.magnitude_std > 0:                                     # timm's magnitude noise
                m += self.magnitude_std * torch.randn(()).item()
            m = min(max(m, 0.0), 10.0)                                     # timm's level range
            level, signed, _ = RAND_OPS[names[i]]
            v = level(m) if level is not None else None
            if signed and torch.rand(()).item() > 0.5:
                v = -v
            chosen.append((names[i], v))
        return chosen

    def __call__(self, img):
        for name, v in self.draw():
            img = RAND_OPS[name][2](img, v, self.fill, self.resample)
        return img

    def __repr__(self):
        return (f'RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, '
                f'magnitude_std={self.magnitude_std}, prob={self.prob}, inc1)')

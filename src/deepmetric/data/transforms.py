"""Image transforms: the standard DML train augmentation and test transform (torchvision)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(
    train: bool,
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
) -> T.Compose:
    """Train: random resized crop ``size`` + horizontal flip; test: resize ``resize`` + centre crop ``size``."""
    if train:
        ops = [T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(resize), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])


# --- The published DML pipelines (datasets.md §3) and backbone-matched normalisation ---------------

BNINCEPTION_MEAN_BGR = (104.0, 117.0, 128.0)


class CaffeBGR:
    """BN-Inception (Caffe port) input: RGB [0, 1] tensor -> BGR, scaled to 0-255, minus [104, 117, 128]."""

    def __init__(self, mean: Sequence[float] = BNINCEPTION_MEAN_BGR):
        self.mean = tuple(float(m) for m in mean)

    def __call__(self, x):  # x: [3, H, W] float tensor in [0, 1], RGB
        bgr = x[[2, 1, 0]] * 255.0
        return bgr - bgr.new_tensor(self.mean)[:, None, None]

    def __repr__(self) -> str:
        return f"CaffeBGR(mean={self.mean})"


NORMALIZATIONS = ("imagenet", "bninception", "none")

# name -> (train crop, test crop, resize before crop, train scale, train ratio, square resize, LANCZOS)
PIPELINES: dict[str, dict] = {
    # Proxy-Anchor / Roth et al.: RandomResizedCrop(224) + flip | Resize(256) + CenterCrop(224)
    "default": dict(size=224, resize=256, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), pre_resize=False,
                    square=False, lanczos=False),
    # Musgrave et al. 2020 / CCP: Resize(256) -> RandomResizedCrop(227, (0.16, 1)) + flip | Resize(256) + CenterCrop(227)
    "reality_check": dict(size=227, resize=256, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), pre_resize=True,
                          square=False, lanczos=False),
    # IAA: Resize((256, 256)) -> RandomResizedCrop(224, (0.16, 1)) + flip | Resize((256, 256)) + CenterCrop(224)
    "iaa": dict(size=224, resize=256, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), pre_resize=True,
                square=True, lanczos=True),
    # IAA on CUB: no square resize before the train crop; test Resize(256) (shorter side)
    "iaa_cub": dict(size=224, resize=256, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3), pre_resize=False,
                    square=False, lanczos=True),
}


def normalization_for(backbone: str) -> str:
    """The input normalisation a backbone was trained with: ``bninception`` (Caffe BGR) or ``imagenet``."""
    return "bninception" if "bninception" in backbone.lower() else "imagenet"


def _normalize_op(normalization: str):
    from deepmetric.errors import ConfigError, suggest

    if normalization == "imagenet":
        return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if normalization == "bninception":
        return CaffeBGR()
    if normalization == "none":
        return None
    raise ConfigError(
        f"unknown normalization {normalization!r}.{suggest(normalization, NORMALIZATIONS)} "
        f"Valid: {', '.join(NORMALIZATIONS)}"
    )


def build_transform(
    train: bool,
    pipeline: str = "default",
    normalization: str = "imagenet",
    size: int | None = None,
    resize: int | None = None,
) -> T.Compose:
    """The train augmentation or test transform of a published ``pipeline`` (see :data:`PIPELINES`).

    ``normalization`` matches the backbone: ``imagenet`` (ResNet, ViT, DINO), ``bninception`` (BGR, 0-255,
    mean-subtracted) or ``none``. ``size`` / ``resize`` override the pipeline's crop and resize sizes.
    """
    from deepmetric.errors import ConfigError, suggest

    if pipeline not in PIPELINES:
        raise ConfigError(
            f"unknown image pipeline {pipeline!r}.{suggest(pipeline, PIPELINES)} Valid: {', '.join(PIPELINES)}"
        )
    p = PIPELINES[pipeline]
    size = size or p["size"]
    resize = resize or (p["resize"] if size == p["size"] else round(size * p["resize"] / p["size"]))
    interp = T.InterpolationMode.LANCZOS if p["lanczos"] else T.InterpolationMode.BILINEAR
    first = T.Resize((resize, resize) if p["square"] else resize, interpolation=interp)
    if train:
        ops = [first] if p["pre_resize"] else []
        ops += [T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"], interpolation=interp),
                T.RandomHorizontalFlip()]
    else:
        ops = [first, T.CenterCrop(size)]
    norm = _normalize_op(normalization)
    return T.Compose([*ops, T.ToTensor(), *([norm] if norm is not None else [])])

"""Backbones: a small CNN for 8x8 inputs, and any timm or torchvision model by name.

Pretrained weights go through each library's normal loading (timm: Hugging Face hub cache;
torchvision: torch hub cache, ``$TORCH_HOME``). Offline, uncached weights raise
:class:`~deepmetric.errors.BackboneWeightsError` explaining how to provide them
(``pretrained_path`` = a local weight file, or a pre-filled cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepmetric.errors import BackboneWeightsError, ConfigError, UnknownNameError, suggest
from deepmetric.models.pooling import GlobalPool, PooledFeatures, check_pool
from deepmetric.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")

#: Short names used in DML papers -> the timm / torchvision model they denote.
ALIASES = {
    "resnet50": "timm:resnet50",
    "vit_small_patch16_224": "timm:vit_small_patch16_224",
    "dino_vits16": "timm:vit_small_patch16_224.dino",
}


@BACKBONES.register("small_cnn")
class SmallCNN(nn.Module):
    """A small CNN for 8x8 inputs: 3x3 conv blocks (BN, ReLU), a 2x2 max-pool, then pooling.

    ``pool="avg"``: a third block and global average pooling (``4 * width`` features);
    ``pool="flatten"``: the ``2 * width x 4 x 4`` map flattened (keeps where the strokes are);
    ``pool="none"``: the third block's ``4 * width x 4 x 4`` map unpooled (``num_features`` = its channels),
    for heads that pool themselves (``multi_head``).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, pool: str = "avg", input_size: int = 8):
        super().__init__()
        if pool not in ("avg", "flatten", "none"):
            raise ValueError(f"pool must be 'avg', 'flatten' or 'none', got {pool!r}")

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        layers = [*block(in_channels, width), *block(width, 2 * width), nn.MaxPool2d(2)]
        if pool == "flatten":
            self.num_features = 2 * width * (input_size // 2) ** 2
            layers.append(nn.Flatten())
        else:
            layers += block(2 * width, 4 * width)
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool == "avg" else []
            self.num_features = 4 * width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _weights_error(name: str, source: str, exc: Exception) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"pretrained weights for {source} model {name!r} could not be loaded ({type(exc).__name__}: {exc}). "
        "deepmetric never downloads at run time when offline: pass model.pretrained_path=<local weight file>, "
        "pre-fill the cache (Hugging Face hub cache for timm, $TORCH_HOME for torchvision), "
        "or set model.pretrained=false."
    )


def _timm(name: str, pretrained: bool, pretrained_path: str | None, pool: str | None = None, **kwargs: Any) -> nn.Module:
    import timm

    if pool is not None and "global_pool" in kwargs:
        raise ConfigError("give either pool (deepmetric's: avg, max, avg+max) or timm's global_pool, not both")

    overlay = {"file": str(pretrained_path)} if pretrained_path else None
    try:
        model = timm.create_model(
            name, pretrained=pretrained or bool(pretrained_path), num_classes=0,
            pretrained_cfg_overlay=overlay, **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - hub, network, pickle and shape errors all mean "no weights"
        if pretrained or pretrained_path:
            raise _weights_error(name, "timm", exc) from exc
        raise
    if pool is not None:
        return PooledFeatures(model, check_pool(pool))
    return model  # timm models with num_classes=0 return pooled features and expose num_features


def _strip_classifier(model: nn.Module) -> int:
    """Replace the final Linear of a torchvision classifier by Identity; return its input size."""
    for attr in ("fc", "classifier", "heads", "head"):
        holder = getattr(model, attr, None)
        if holder is None:
            continue
        if isinstance(holder, nn.Linear):
            setattr(model, attr, nn.Identity())
            return holder.in_features
        linears = [(n, m) for n, m in holder.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            last_name, last = linears[-1]
            parent = holder.get_submodule(last_name.rsplit(".", 1)[0]) if "." in last_name else holder
            setattr(parent, last_name.rsplit(".", 1)[-1], nn.Identity())
            return last.in_features
    raise ValueError(f"cannot find the classifier layer of {type(model).__name__} to remove")


def _torchvision(name: str, pretrained: bool, pretrained_path: str | None, pool: str | None = None,
                 **kwargs: Any) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained and not pretrained_path else None, **kwargs)
        if pretrained_path:
            model.load_state_dict(torch.load(Path(pretrained_path), map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - hub, network, pickle and shape errors all mean "no weights"
        if pretrained or pretrained_path:
            raise _weights_error(name, "torchvision", exc) from exc
        raise
    model.num_features = _strip_classifier(model)
    if pool is not None:
        if not isinstance(getattr(model, "avgpool", None), nn.Module):
            raise ConfigError(f"pool= needs a torchvision CNN with an `avgpool` layer (e.g. resnet50); {name!r} has none")
        model.avgpool = GlobalPool(pool)
    return model


def build(name: str, pretrained: bool = False, pretrained_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build backbone ``name``: registered, an alias, else timm, else torchvision (``timm:``/``torchvision:`` force one).

    ``pool`` (``avg``, ``max``, ``avg+max`` = GAP + GMP summed, Proxy-Anchor style) replaces the global pooling
    of a timm or torchvision CNN; registered backbones take it as their own keyword.
    """
    name = ALIASES.get(name, name)
    source, _, bare = name.rpartition(":")
    if not source and name in BACKBONES:
        if "pretrained_path" in BACKBONES.parameters(name):  # e.g. bninception: weights from a local file
            return BACKBONES.build(name, pretrained=pretrained, pretrained_path=pretrained_path, **kwargs)
        if pretrained or pretrained_path:
            raise BackboneWeightsError(f"backbone {name!r} has no pretrained weights; set pretrained=false")
        return BACKBONES.build(name, **kwargs)
    import timm
    import torchvision

    if source in ("", "timm") and timm.is_model(bare):
        return _timm(bare, pretrained, pretrained_path, **kwargs)
    if source in ("", "torchvision") and bare in torchvision.models.list_models():
        return _torchvision(bare, pretrained, pretrained_path, **kwargs)
    if source not in ("", "timm", "torchvision"):
        raise UnknownNameError(f"unknown backbone source {source!r} in {name!r}; use 'timm:' or 'torchvision:'")
    pool = BACKBONES.available() + torchvision.models.list_models() + timm.list_models()
    raise UnknownNameError(
        f"unknown backbone {name!r}.{suggest(bare, pool)} Registered: {', '.join(BACKBONES.available())}; "
        "any timm or torchvision model name also works (see `deepmetric list backbones`)."
    )


def available() -> list[str]:
    """Registered backbone names and aliases (any timm / torchvision model name is accepted by :func:`build` too)."""
    return sorted(BACKBONES.available() + list(ALIASES))

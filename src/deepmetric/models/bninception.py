"""BN-Inception (Ioffe & Szegedy 2015, "Batch Normalization"), the Caffe model ported by Cadene's
``pretrainedmodels`` and used by most DML papers up to 2020 (Reality Check, Multi-Similarity, Proxy-Anchor).

It is not in timm or torchvision. Parameter names are the port's (``conv1_7x7_s2``, ``inception_3a_1x1_bn``,
...), so its ``bn_inception-239d2248.pth`` loads as it is (``last_linear.*``, the ImageNet classifier, is
dropped). Weights come only from a local file (``model.pretrained_path``); nothing is downloaded.

Inputs follow the Caffe convention: **BGR, 0-255, minus the mean [104, 117, 128]**, std 1 (the trainer picks
this normalisation for any backbone named ``bninception``; see ``data.transforms.normalization_for``).
Every convolution is followed by BatchNorm and ReLU; an inception module concatenates a 1x1 branch, a 1x1 ->
3x3 branch, a 1x1 -> 3x3 -> 3x3 branch and a pooling branch (3x3 average, or max in 5b, then a 1x1
projection); the reduction modules 3c and 4e have no 1x1 branch, stride 2 and an unprojected 3x3 max-pool.
Max and average pools use ``ceil_mode`` as in Caffe. The 1024-channel map is pooled globally (``pool``:
``avg`` as in the paper and the Reality Check, or ``avg+max`` as in the Proxy-Anchor code). BatchNorm keeps
PyTorch's momentum 0.1 (the port's 0.9 is a Caffe conversion slip; it matters only when BN is not frozen).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepmetric.errors import BackboneWeightsError
from deepmetric.models.backbones import BACKBONES
from deepmetric.models.pooling import GlobalPool

#: (module, in, 1x1, 3x3 reduce, 3x3, double-3x3 reduce, double 3x3, pool, pool projection, stride);
#: 0 = branch absent. Output channels = 1x1 + 3x3 + double 3x3 + (projection, or `in` when unprojected).
MODULES = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
)

WEIGHTS_FILE = "bn_inception-239d2248.pth"


@BACKBONES.register("bninception")
class BNInception(nn.Module):
    """BN-Inception (Ioffe & Szegedy 2015), Caffe port (Cadene ``pretrainedmodels`` names): 1024 features."""

    num_features = 1024

    def __init__(self, pretrained: bool = False, pretrained_path: str | None = None, pool: str = "avg"):
        super().__init__()
        self._unit("conv1_7x7_s2", 3, 64, 7, 2)
        self._unit("conv2_3x3_reduce", 64, 64)
        self._unit("conv2_3x3", 64, 192, 3)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for name, cin, n1, n3r, n3, ndr, nd, pool_kind, proj, stride in MODULES:
            p = f"inception_{name}_"
            if n1:
                self._unit(p + "1x1", cin, n1)
            self._unit(p + "3x3_reduce", cin, n3r)
            self._unit(p + "3x3", n3r, n3, 3, stride)
            self._unit(p + "double_3x3_reduce", cin, ndr)
            self._unit(p + "double_3x3_1", ndr, nd, 3)
            self._unit(p + "double_3x3_2", nd, nd, 3, stride)
            if pool_kind == "avg":
                pool_layer: nn.Module = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
            elif stride == 2:
                pool_layer = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            else:
                pool_layer = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
            setattr(self, p + "pool", pool_layer)
            if proj:
                self._unit(p + "pool_proj", cin, proj)
        self.global_pool = GlobalPool(pool)
        if pretrained_path:
            self.load_weights(pretrained_path)
        elif pretrained:
            raise BackboneWeightsError(
                "BN-Inception is in neither timm nor torchvision, and deepmetric never downloads: set "
                f"model.pretrained_path to a local copy of Cadene's pretrainedmodels weights ({WEIGHTS_FILE})"
            )

    def _unit(self, name: str, cin: int, cout: int, kernel: int = 1, stride: int = 1) -> None:
        setattr(self, name, nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2))
        setattr(self, name + "_bn", nn.BatchNorm2d(cout))

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """conv -> BatchNorm -> ReLU."""
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1024-channel map before pooling (``[B, 1024, 7, 7]`` at 224 px)."""
        x = self.pool1_3x3_s2(self._run("conv1_7x7_s2", x))
        x = self.pool2_3x3_s2(self._run("conv2_3x3", self._run("conv2_3x3_reduce", x)))
        for name, _, n1, *_rest, proj, _stride in MODULES:
            p = f"inception_{name}_"
            branches = [self._run(p + "1x1", x)] if n1 else []
            branches.append(self._run(p + "3x3", self._run(p + "3x3_reduce", x)))
            double = self._run(p + "double_3x3_reduce", x)
            branches.append(self._run(p + "double_3x3_2", self._run(p + "double_3x3_1", double)))
            pooled = getattr(self, p + "pool")(x)
            branches.append(self._run(p + "pool_proj", pooled) if proj else pooled)
            x = torch.cat(branches, dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.forward_features(x))

    def load_weights(self, path: str | Path) -> None:
        """Load the port's state dict from ``path`` (``last_linear.*`` ignored); any other mismatch is an error."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - missing file, pickle and format errors all mean "no weights"
            raise BackboneWeightsError(
                f"cannot read BN-Inception weights from {path} ({type(exc).__name__}: {exc}); expected the "
                f"state dict of Cadene's pretrainedmodels ({WEIGHTS_FILE})"
            ) from exc
        state = {k: v for k, v in state.items() if not k.startswith("last_linear.")}
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise BackboneWeightsError(f"BN-Inception weights in {path} do not fit the architecture: {exc}") from exc
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise BackboneWeightsError(
                f"{path} is not a BN-Inception state dict with Cadene's pretrainedmodels key names ({WEIGHTS_FILE}): "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )

"""BN-Inception: the Caffe port's architecture and key names, weights from a local file only, Caffe input."""

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric import models
from deepmetric.errors import BackboneWeightsError
from deepmetric.models import EmbeddingHead, EmbeddingModel
from deepmetric.models.bninception import BNInception


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.build("bninception").eval()


def _cadene_style_weights(path, seed=1):
    """A random state dict with the port's key names, as the old file holds it: no ``num_batches_tracked``,
    plus the ImageNet classifier ``last_linear``."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in BNInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    state["last_linear.weight"], state["last_linear.bias"] = torch.randn(1000, 1024, generator=g), torch.zeros(1000)
    torch.save(state, path)
    return state


def test_architecture_matches_the_caffe_port(net):
    # 10,270,240 = the parameter count of Cadene's BNInception without its 1000-way classifier
    assert sum(p.numel() for p in net.parameters()) == 10_270_240
    keys = set(net.state_dict())
    assert {"conv1_7x7_s2.weight", "conv1_7x7_s2_bn.running_var", "conv2_3x3_reduce.bias",
            "inception_3a_double_3x3_2_bn.weight", "inception_5b_pool_proj.weight"} <= keys
    # the reduction modules 3c and 4e have no 1x1 branch and no pool projection
    assert not any(k.startswith(("inception_3c_1x1", "inception_3c_pool_proj", "inception_4e_1x1")) for k in keys)
    assert net.inception_3c_3x3.stride == (2, 2) and net.inception_4e_double_3x3_2.stride == (2, 2)
    with torch.no_grad():
        for size in (224, 227):  # the standard crop and the Reality Check's
            assert net.forward_features(torch.zeros(1, 3, size, size)).shape == (1, 1024, 7, 7)
        assert net(torch.zeros(2, 3, 64, 64)).shape == (2, net.num_features) == (2, 1024)


def test_weights_load_from_a_local_file_only(tmp_path):
    path = tmp_path / "bn_inception-239d2248.pth"
    state = _cadene_style_weights(path)
    net = models.build("bninception", pretrained=True, pretrained_path=str(path))
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("last_linear"))
    with pytest.raises(BackboneWeightsError, match="pretrained_path.*bn_inception-239d2248.pth"):
        models.build("bninception", pretrained=True)  # never a download


def test_wrong_weight_files_are_clear_errors(tmp_path):
    state = _cadene_style_weights(tmp_path / "w.pth")
    renamed = {k.replace("inception_3a_1x1.", "inception_3a_1x1_conv."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(BackboneWeightsError, match=r"2 missing.*inception_3a_1x1\.weight.*2 unexpected"):
        models.build("bninception", pretrained_path=str(tmp_path / "renamed.pth"))
    state["conv1_7x7_s2.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(BackboneWeightsError, match="do not fit"):
        models.build("bninception", pretrained_path=str(tmp_path / "shape.pth"))
    with pytest.raises(BackboneWeightsError, match="cannot read"):
        models.build("bninception", pretrained_path=str(tmp_path / "missing.pth"))


def test_trainer_builds_it_with_caffe_input(tmp_path):
    """Through the config: weights from ``model.pretrained_path``, ``pool`` from ``backbone_kwargs``, and the
    data pipeline normalised the Caffe way (BGR, 0-255, minus [104, 117, 128])."""
    from deepmetric.training import load
    from deepmetric.training.build import build_model, build_splits

    _cadene_style_weights(tmp_path / "w.pth")
    for c in range(4):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (250, 128, 10)).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    cfg = load(None, ["data.name=image_folder", f"data.root={tmp_path / 'imgs'}", "model.backbone=bninception",
                      f"model.pretrained_path={tmp_path / 'w.pth'}", "model.backbone_kwargs={pool: avg+max}",
                      "model.freeze_bn=true", "data.kwargs={image_size: 64}"])
    model = build_model(cfg)
    assert model.backbone.global_pool.pool == "avg+max"
    x = build_splits(cfg).test[0][0]
    assert x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 10, 10], torch.tensor([10.0 - 104, 128 - 117, 250 - 128]), atol=1.5)
    model.train()
    before = [b.clone() for n, b in model.backbone.named_buffers() if "running" in n]
    model(x[None].repeat(2, 1, 1, 1))
    after = [b for n, b in model.backbone.named_buffers() if "running" in n]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # frozen BN keeps the ImageNet statistics


def test_embedding_model_with_random_bninception_is_finite(net):
    model = EmbeddingModel(net, EmbeddingHead(net.num_features, 128), freeze_bn=True).eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-128, 128, (2, 3, 64, 64)).astype(np.float32))
    z = model(x)
    assert z.shape == (2, 128) and torch.isfinite(z).all()

import pytest
import torch

from deepmetric import models
from deepmetric.errors import BackboneWeightsError, ConfigError, UnknownNameError
from deepmetric.models import EmbeddingHead, EmbeddingModel


@pytest.mark.parametrize("pool,features", [("avg", 128), ("flatten", 1024)])
def test_small_cnn(pool, features):
    net = models.build("small_cnn", pool=pool)
    assert net.num_features == features
    assert net(torch.zeros(3, 1, 8, 8)).shape == (3, features)
    assert "small_cnn" in models.available()


def test_timm_and_torchvision_by_name():
    timm_net = models.build("resnet18")
    assert timm_net(torch.zeros(2, 3, 32, 32)).shape == (2, timm_net.num_features) == (2, 512)
    tv = models.build("torchvision:mobilenet_v3_small")
    assert tv(torch.zeros(2, 3, 32, 32)).shape == (2, tv.num_features)


def test_unknown_backbone_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet50'"):
        models.build("resnet5O")
    with pytest.raises(UnknownNameError, match="source"):
        models.build("keras:resnet50")


def test_torchvision_pretrained_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; no network here
    with pytest.raises(BackboneWeightsError, match="pretrained_path"):
        models.build("torchvision:resnet18", pretrained=True)
    with pytest.raises(BackboneWeightsError, match="no pretrained weights"):
        models.build("small_cnn", pretrained=True)


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_pretrained_from_a_local_file(tmp_path, name):
    """The library's normal weight loading, fed a weight file the test writes (no download)."""
    src = models.build(name)
    path = tmp_path / "weights.pth"
    if name.startswith("torchvision:"):
        import torchvision

        full = torchvision.models.resnet18()
        torch.nn.init.constant_(full.conv1.weight, 0.5)
        torch.save(full.state_dict(), path)
    else:
        torch.nn.init.constant_(src.conv1.weight, 0.5)
        torch.save(src.state_dict(), path)
    loaded = models.build(name, pretrained=True, pretrained_path=str(path))
    assert torch.all(loaded.conv1.weight == 0.5)
    with pytest.raises(BackboneWeightsError):
        (tmp_path / "bad.pth").write_bytes(b"junk")
        models.build(name, pretrained=True, pretrained_path=str(tmp_path / "bad.pth"))


def test_head_and_frozen_bn():
    head = EmbeddingHead(128, 16, batch_norm=True, normalize=True)
    model = EmbeddingModel(models.build("small_cnn"), head, freeze_bn=True)
    model.train()
    z = model(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 16) and torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    assert head.bn.training  # the head's BN is not frozen
    raw = EmbeddingHead(8, 4, normalize=False)(torch.ones(2, 8) * 10)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))


def test_identity_head_passes_the_features_through():
    f = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0]])
    square = EmbeddingHead(3, 3, normalize=False, init="identity")
    assert torch.equal(square(f), f) and torch.equal(square.linear.bias, torch.zeros(3))
    assert torch.equal(EmbeddingHead(3, 2, normalize=False, init="identity")(f), f[:, :2])  # first features kept
    wide = EmbeddingHead(3, 5, normalize=False, init="identity")(f)
    assert torch.equal(wide, torch.cat([f, torch.zeros(2, 2)], 1))  # extra outputs start at zero
    unit = EmbeddingHead(3, 3, init="identity")(f)
    assert torch.allclose(unit, f / f.norm(dim=1, keepdim=True))
    assert not torch.allclose(EmbeddingHead(3, 3, normalize=False)(f), f)  # the default init is random


def test_identity_head_trains_every_weight():
    """Zero-initialised rows and columns still get gradients (an identity start is not a frozen one)."""
    torch.manual_seed(0)
    head = EmbeddingHead(4, 6, init="identity")
    (head(torch.randn(5, 4)) * torch.randn(5, 6)).sum().backward()
    assert (head.linear.weight.grad[4:] != 0).any() and (head.linear.weight.grad[:, :4] != 0).all()
    model = EmbeddingModel(models.build("small_cnn", pool="flatten", width=4), EmbeddingHead(128, 128, init="identity"))
    (model(torch.rand(3, 1, 8, 8)) * torch.randn(3, 128)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_unknown_head_init_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown head init 'identiy'.*Did you mean 'identity'"):
        EmbeddingHead(4, 4, init="identiy")


def test_paper_aliases():
    assert {"resnet50", "dino_vits16", "vit_small_patch16_224", "small_cnn"} <= set(models.available())
    net = models.build("dino_vits16")
    assert net.num_features == 384

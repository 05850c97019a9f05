"""Global pooling: GAP, GMP and Proxy-Anchor's GAP + GMP sum, on timm, torchvision and BN-Inception."""

import pytest
import torch

from deepmetric import models
from deepmetric.errors import ConfigError, InputError
from deepmetric.models.pooling import GlobalPool


def test_formulas_on_a_hand_case():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, -5.0], [0.0, -2.0]]]])  # [1, 2, 2, 2]
    assert GlobalPool("avg")(x).tolist() == [[3.0, -2.0]]
    assert GlobalPool("max")(x).tolist() == [[6.0, 0.0]]
    assert GlobalPool("avg+max")(x).tolist() == [[9.0, -2.0]]  # a sum, not timm's avgmax mean (4.5, -1)


def test_gradient():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)  # distinct values: max is differentiable
    assert torch.autograd.gradcheck(GlobalPool("avg+max"), (x,))
    GlobalPool("avg+max")(x).sum().backward()
    grad = x.grad.flatten(2)
    assert torch.allclose(grad.sum(-1), torch.full((2, 3), 2.0, dtype=torch.float64))  # 1 (mean) + 1 (arg max)
    assert ((grad > 1 / 20 + 1e-12).sum(-1) == 1).all()


def _features(net, x, layer):
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.setdefault("map", o))
    out = net(x)
    return out, seen["map"]


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_cnn_backbones_take_avg_plus_max(name):
    torch.manual_seed(0)
    net = models.build(name, pool="avg+max").eval()
    x = torch.randn(2, 3, 64, 64)
    layer4 = net.model.layer4 if name == "resnet18" else net.layer4
    with torch.no_grad():
        out, fmap = _features(net, x, layer4)
    assert out.shape == (2, net.num_features) == (2, 512)
    assert torch.allclose(out, fmap.mean((2, 3)) + fmap.amax((2, 3)), atol=1e-5)


def test_timm_avg_is_timms_own_pooling():
    torch.manual_seed(0)
    net = models.build("resnet18", pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), net.model(x), atol=1e-6)  # the wrapped model pools with timm's GAP


def test_bninception_pool_option():
    torch.manual_seed(0)
    net = models.build("bninception", pool="max").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), net.forward_features(x).amax((2, 3)))


def test_bad_pool_choices_are_clear_errors():
    with pytest.raises(ConfigError, match="Did you mean 'avg\\+max'"):
        models.build("resnet18", pool="avg+maxx")
    with pytest.raises(ConfigError, match="either pool"):
        models.build("resnet18", pool="avg", global_pool="avgmax")
    with pytest.raises(ConfigError, match="avgpool"):
        models.build("torchvision:shufflenet_v2_x0_5", pool="avg+max")
    vit = models.build("vit_tiny_patch16_224", pool="avg", img_size=32)
    with pytest.raises(InputError, match="convolutional feature map"):
        vit(torch.zeros(1, 3, 32, 32))

"""view_contrast: the affine views (exact shifts, rotations), NT-Xent by hand, gradients, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import regularizers
from deepmetric.errors import ConfigError
from deepmetric.losses.pair import NTXentLoss
from deepmetric.regularizers import ViewContrast, affine_views, random_views
from deepmetric.step import StepInputs


def views(x, angle=0.0, scale=1.0, shift=(0.0, 0.0)):
    b = x.shape[0]
    return affine_views(x, torch.full((b,), angle), torch.full((b,), scale), torch.tensor([shift]).expand(b, 2))


def test_integer_shifts_move_pixels_exactly_right_and_down():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 1.0
    right = torch.zeros_like(x)
    right[0, 0, 1, 2] = 1.0
    down = torch.zeros_like(x)
    down[0, 0, 2, 1] = 1.0
    assert torch.equal(views(x, shift=(1.0, 0.0)), right)
    assert torch.equal(views(x, shift=(0.0, 1.0)), down)
    assert torch.equal(views(x, shift=(0.0, -2.0))[0, 0, 0], torch.zeros(4))  # shifted out: zero fill


def test_rotations_by_quarter_turns_equal_rot90_and_identity_is_exact():
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(views(x, angle=math.pi / 2), torch.rot90(x, 1, (2, 3)), atol=1e-6)
    wide = torch.rand(2, 1, 4, 6)  # non-square: a half turn still maps the grid onto itself
    assert torch.allclose(views(wide, angle=math.pi), torch.rot90(wide, 2, (2, 3)), atol=1e-6)
    assert torch.equal(random_views(x, shift=0, rotate=0, scale=0), x)


def test_scaling_up_keeps_the_centre_and_random_views_differ_per_image():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1:3, 1:3] = 1.0  # scaled by 2 about the centre, the central 2x2 block covers the central pixels
    assert torch.allclose(views(x, scale=2.0)[0, 0, 1:3, 1:3], torch.ones(2, 2))
    same = torch.rand(1, 1, 8, 8).expand(6, 1, 8, 8)
    out = random_views(same, shift=1, rotate=10, scale=0.1)
    assert not torch.allclose(out[0], out[1])


def test_contrast_by_hand_two_images():
    # views a = (e1, e2), b = (e1, (e1 + e2)/sqrt 2); tau 0.5; row i's positive is its other view
    r = 1 / math.sqrt(2)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [r, r]])
    z = torch.cat([a, b])
    s = z @ z.T
    tau, pos = 0.5, [2, 3, 0, 1]
    expected = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        expected += -math.log(math.exp(s[i, pos[i]] / tau) / sum(math.exp(s[i, j] / tau) for j in others))
    vc = ViewContrast(temperature=tau)
    assert vc.contrast(a, b).item() == pytest.approx(expected / 4, rel=1e-6)
    ids = torch.arange(2)
    assert vc.contrast(a, b).item() == pytest.approx(NTXentLoss(tau)(z, torch.cat([ids, ids])).item(), rel=1e-6)


def test_contrast_is_invariant_to_scale_and_joint_rotation_and_gradchecks():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    vc = ViewContrast(temperature=0.3)
    assert vc.contrast(3 * a @ q, b @ q).item() == pytest.approx(vc.contrast(a, b).item(), rel=1e-10)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(vc.contrast, (a, b))


def test_forward_with_identity_views_embeds_the_inputs_twice():
    class Flat(nn.Module):
        def forward(self, x):
            return F.normalize(x.flatten(1), dim=1)

    x = torch.rand(4, 1, 3, 3)
    step = StepInputs(embeddings=torch.zeros(4, 9), labels=torch.zeros(4, dtype=torch.long), raw=torch.zeros(4, 9),
                      inputs=x, sample_ids=torch.arange(4), is_synthetic=torch.zeros(4, dtype=torch.bool),
                      model=Flat(), epoch=1, epochs=1)
    vc = regularizers.build("view_contrast", temperature=0.2, shift=0, rotate=0, scale=0)
    z = Flat()(x)
    assert vc(step).item() == pytest.approx(vc.contrast(z, z).item(), rel=1e-6)
    with pytest.raises(ConfigError, match=r"image inputs \[B, C, H, W\]"):
        vc(StepInputs(**{**step.__dict__, "inputs": torch.rand(4, 9)}))


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"shift": -1}, {"rotate": -5}, {"scale": 1.0}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="view_contrast: need temperature > 0"):
        ViewContrast(**kwargs)

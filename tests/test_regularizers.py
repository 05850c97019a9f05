"""SEC and LSD: formulas by hand, limits, invariances, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepmetric import regularizers
from deepmetric.errors import ConfigError
from deepmetric.regularizers import ListwiseSelfDistillation, SphericalEmbeddingConstraint, listwise_kl
from deepmetric.step import StepInputs


def step_for(raw, labels=None, *, inputs=None, model=None, epoch=2, epochs=4):
    emb = F.normalize(raw, dim=1)
    n = raw.shape[0]
    labels = torch.zeros(n, dtype=torch.long) if labels is None else labels
    return StepInputs(embeddings=emb, labels=labels, raw=raw, inputs=raw if inputs is None else inputs,
                      sample_ids=torch.arange(n), is_synthetic=torch.zeros(n, dtype=torch.bool),
                      model=model or nn.Identity(), epoch=epoch, epochs=epochs)


def test_registry_keys():
    assert {"sec", "lsd"} <= set(regularizers.available())


# ---------------------------------------------------------------------------------------------- SEC


def test_sec_by_hand_and_zero_for_equal_norms():
    raw = torch.tensor([[3.0, 4.0], [0.0, 1.0], [2.0, 0.0]])  # norms 5, 1, 2 -> mean 8/3
    mu = 8 / 3
    expected = ((5 - mu) ** 2 + (1 - mu) ** 2 + (2 - mu) ** 2) / 3
    sec = SphericalEmbeddingConstraint()
    assert sec(step_for(raw)).item() == pytest.approx(expected, rel=1e-6)
    same = F.normalize(torch.randn(6, 4), dim=1) * 2.5
    assert sec(step_for(same)).item() == pytest.approx(0.0, abs=1e-10)


def test_sec_scales_quadratically():
    raw = torch.randn(8, 5, dtype=torch.float64)
    sec = SphericalEmbeddingConstraint()
    assert sec(step_for(3 * raw)).item() == pytest.approx(9 * sec(step_for(raw)).item(), rel=1e-10)


def test_sec_gradient_is_the_papers_and_moves_norms_to_their_mean():
    raw = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    sec = SphericalEmbeddingConstraint()
    sec(step_for(raw)).backward()
    norms = raw.detach().norm(dim=1)
    expected = (2 / 6) * (norms - norms.mean())[:, None] * raw.detach() / norms[:, None]  # μ detached
    torch.testing.assert_close(raw.grad, expected)
    torch.autograd.gradcheck(lambda r: sec(step_for(r)), (raw.detach().clone().requires_grad_(),))
    stepped = raw.detach() - 0.1 * raw.grad
    assert stepped.norm(dim=1).var() < norms.var()


def test_sec_moving_average_of_the_mean_norm():
    sec = SphericalEmbeddingConstraint(momentum=0.5)
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean norm 2
    b = torch.tensor([[4.0, 0.0], [6.0, 0.0]])  # mean norm 5
    assert sec(step_for(a)).item() == pytest.approx(1.0)
    value = sec(step_for(b)).item()  # μ = 0.5·2 + 0.5·5 = 3.5 -> ((0.5)² + (2.5)²)/2
    assert sec.mean_norm.item() == pytest.approx(3.5) and value == pytest.approx((0.25 + 6.25) / 2)
    state = sec.state_dict()
    other = SphericalEmbeddingConstraint(momentum=0.5)
    other.load_state_dict(state)
    assert other.mean_norm.item() == pytest.approx(3.5)
    with pytest.raises(ConfigError, match="momentum"):
        SphericalEmbeddingConstraint(momentum=0)


# ---------------------------------------------------------------------------------------------- LSD


def test_listwise_kl_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    # student lists: [1, 0], [0, 1]; teacher lists: [1, 1], [1, 1] -> p_T = [.5, .5]
    ps = torch.softmax(torch.tensor([1.0, 0.0], dtype=torch.float64), 0)
    kl = (0.5 * (torch.log(torch.tensor(0.5, dtype=torch.float64)) - ps.log())).sum()
    assert listwise_kl(s, t, labels).item() == pytest.approx(kl.item(), rel=1e-12)
    # beta scales the other-label entries: student lists [1, 0], [0, 1]; teacher lists [1, .5], [.5, 1]
    pt = torch.softmax(torch.tensor([1.0, 0.5], dtype=torch.float64), 0)
    assert listwise_kl(s, t, labels, beta=0.5).item() == pytest.approx(
        (pt * (pt.log() - ps.log())).sum().item(), rel=1e-12)


def test_listwise_kl_zero_for_equal_teacher_and_order_invariant():
    x = F.normalize(torch.randn(10, 6, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(10, 6, dtype=torch.float64), dim=1)
    y = torch.randint(0, 3, (10,))
    assert listwise_kl(x, x, y).item() == pytest.approx(0.0, abs=1e-12)
    perm = torch.randperm(10)
    assert listwise_kl(x[perm], t[perm], y[perm]).item() == pytest.approx(listwise_kl(x, t, y).item(), rel=1e-10)
    assert listwise_kl(x, t, y, tau=0.5).item() != pytest.approx(listwise_kl(x, t, y).item())


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def test_listwise_kl_inside_an_autocast_region_is_the_float32_value():
    """A caller's mixed-precision region does not turn the similarity lists into bfloat16 products."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(24, 32, generator=g), dim=1)
    t = F.normalize(x + 0.3 * torch.randn(24, 32, generator=g), dim=1)
    y = torch.arange(24) % 4
    expected = listwise_kl(x, t, y, tau=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = listwise_kl(x, t, y, tau=0.1)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lsd_ramp_teacher_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), Normalize())
    lsd = ListwiseSelfDistillation(model, alpha=10.0, tau=2.0)
    lsd.train()
    assert not lsd.teacher.training and not any(p.requires_grad for p in lsd.teacher.parameters())
    x = torch.randn(8, 5)
    y = torch.randint(0, 3, (8,))

    def step(epoch):
        model.train()
        emb = model(x)
        return StepInputs(embeddings=emb, labels=y, raw=emb, inputs=x, sample_ids=torch.arange(8),
                          is_synthetic=torch.zeros(8, dtype=torch.bool), model=model, epoch=epoch, epochs=4)

    first = step(1)
    assert lsd(first).item() == 0.0  # the progressive ramp starts at zero
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn_like(model[0].weight))  # the student moves away from the teacher
    s = step(3)
    value = lsd(s)
    teacher = lsd.teacher(x)
    expected = (2 / 4) * 10.0 * 4.0 * listwise_kl(s.embeddings, teacher, y, tau=2.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6) and value.item() > 0
    value.backward()
    assert model[0].weight.grad is not None and all(p.grad is None for p in lsd.teacher.parameters())
    lsd.on_epoch_end(model, 3)  # the snapshot: the teacher now equals the model
    for a, b in zip(lsd.teacher.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="tau"):
        ListwiseSelfDistillation(model, tau=0)

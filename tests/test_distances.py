"""Distances: values against torch references, safe gradients at zero distance, chunking, dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric import distances
from deepmetric.errors import UnknownNameError


def data(n=7, m=5, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def test_registry():
    assert distances.available() == ["cosine", "euclidean", "squared_euclidean"]
    with pytest.raises(UnknownNameError, match="euclidean"):
        distances.build("euclidian")
    assert distances.build("cosine").is_similarity and not distances.build("euclidean").is_similarity


@pytest.mark.parametrize("normalize", [False, True])
def test_values(normalize):
    x, y = data()
    xn, yn = (F.normalize(x, dim=1), F.normalize(y, dim=1)) if normalize else (x, y)
    torch.testing.assert_close(distances.build("euclidean", normalize=normalize)(x, y), torch.cdist(xn, yn))
    torch.testing.assert_close(distances.build("squared_euclidean", normalize=normalize)(x, y), torch.cdist(xn, yn) ** 2)
    torch.testing.assert_close(distances.build("euclidean", normalize=normalize)(x), torch.cdist(xn, xn), atol=1e-7, rtol=0)
    torch.testing.assert_close(distances.build("cosine")(x, y), F.normalize(x, dim=1) @ F.normalize(y, dim=1).T)
    assert (distances.build("euclidean")(x).diagonal() == 0).all()


def test_dissimilarity_orientation():
    x, y = data()
    cos = distances.build("cosine")
    torch.testing.assert_close(cos.dissimilarity(x, y), -cos(x, y))
    eu = distances.build("euclidean")
    torch.testing.assert_close(eu.dissimilarity(x, y), eu(x, y))


@pytest.mark.parametrize("name", ["euclidean", "squared_euclidean", "cosine"])
def test_gradcheck_and_symmetric_gram_backward(name):
    x, y = data(n=4, m=3, d=3)
    dist = distances.build(name)
    w = torch.randn(4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: (dist(a) * w).sum(), (x.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda a, b: dist(a, b), (x.clone().requires_grad_(), y.clone().requires_grad_()))


def test_normalize_equals_f_normalize_with_its_gradient():
    x, _ = data(n=6, d=3)
    x[2] = 0.0  # clamped norm: autograd passes no gradient through the norm
    x[3] *= 1e-13
    x.requires_grad_(True)
    g = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = distances.normalize(x)
    assert torch.equal(ours, F.normalize(x, dim=1))
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(F.normalize(x, dim=1), x, g)[0],
                               rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(distances.normalize, (data(n=4, d=3)[0].requires_grad_(),))


def test_euclidean_gradient_finite_at_zero_distance():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    d = distances.build("euclidean")(x)
    assert d[0, 1].item() == 0.0
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    # cross form (y given) at identical rows, too
    a = torch.tensor([[3.0, -1.0]], requires_grad=True)
    distances.build("euclidean")(a, a.detach().clone()).sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad == 0).all()


@pytest.mark.parametrize("name", ["euclidean", "squared_euclidean", "cosine"])
def test_chunking_same_result(name):
    x, y = data(n=11, m=6)
    full = distances.build(name)
    chunked = distances.build(name, chunk_size=3)
    torch.testing.assert_close(chunked(x, y), full(x, y))
    torch.testing.assert_close(chunked(x), full(x), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        distances.build(name, chunk_size=0)


def test_half_input_computed_in_float32_and_float64_kept():
    x, y = data(dtype=torch.float32)
    out = distances.build("euclidean")(x.half(), y.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.cdist(x.half().float(), y.half().float()), rtol=1e-4, atol=1e-4)
    assert distances.build("cosine")(x.double()).dtype == torch.float64


@pytest.mark.parametrize("name", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_paired_dissimilarity_equals_matrix_entries_and_their_gradients(name, with_ref):
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(9, 5, dtype=torch.float64, requires_grad=True) if with_ref else None
    x.data[3] = x.data[7]  # an exact duplicate: distance 0, zero gradient for the root
    i = torch.tensor([0, 3, 3, 11, 5])
    j = torch.tensor([4, 7, 1, 0, 5]) if with_ref else torch.tensor([4, 7, 1, 0, 2])
    dist = distances.build(name)
    inputs = (x,) if ref is None else (x, ref)
    expected = dist.dissimilarity(x, ref)[i, j]
    got = dist.paired_dissimilarity(x, i, j, ref)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), inputs)
    for g_got, g_exp in zip(grads, torch.autograd.grad((expected * w).sum(), inputs)):
        torch.testing.assert_close(g_got, g_exp, rtol=1e-10, atol=1e-12)
    if name == "euclidean" and not with_ref:
        assert got[1] == 0 and torch.isfinite(grads[0]).all()
    assert torch.autograd.gradcheck(lambda *t: dist.paired_dissimilarity(t[0], i, j, t[1] if with_ref else None),
                                    inputs, eps=1e-6, atol=1e-5)


def test_full_precision_disables_autocast_only_where_it_is_enabled():
    a = torch.randn(4, 4)
    with distances.full_precision("cpu"):  # nothing to disable: a plain context
        assert not torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with distances.full_precision("cpu"):
            assert (a @ a).dtype == torch.float32
        assert (a @ a).dtype == torch.bfloat16  # restored on exit


@pytest.mark.parametrize("name", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("with_y", [False, True])
def test_normalized_euclidean_node_equals_normalize_then_matrix(name, with_y):
    """normalize=True runs normalisation and the matrix as one node: the same values and gradients as the
    two steps (the chunked path), including a zero row (the clamped norm)."""
    from deepmetric.distances import normalize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    x[2] = 0.0
    x.requires_grad_(True)
    y = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True) if with_y else None
    fused = distances.build(name, normalize=True)
    plain = distances.build(name)  # the same matrix on inputs normalised beforehand
    w = torch.randn(7, 4 if with_y else 7, dtype=torch.float64, generator=g)
    inputs = (x, y) if with_y else (x,)
    out = fused(x, y)
    ref = plain(normalize(x), None if y is None else normalize(y))
    assert torch.equal(out, ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    xs = x.detach()[[0, 1, 3, 4]].requires_grad_(True)  # gradcheck away from the zero row's kink
    assert torch.autograd.gradcheck(lambda t: fused(t, None if y is None else y.detach()), (xs,))

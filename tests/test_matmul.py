"""deepmetric.matmul.mm: the oneDNN float32 path against torch.mm, its backward, and the fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

from deepmetric import matmul
from deepmetric.matmul import mm

needs_onednn = pytest.mark.skipif(not matmul.AVAILABLE, reason="oneDNN's op does not run on this machine")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """Every test here runs with the oneDNN path on where the op runs, whatever the CPU vendor chose."""
    monkeypatch.setattr(matmul, "ONEDNN", matmul.AVAILABLE)


def _layouts(m: int, k: int, n: int):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    yield "contiguous", a, b
    yield "transposed views", torch.randn(k, m, generator=g).T, torch.randn(n, k, generator=g).T
    yield "strided slices", torch.randn(m, 2 * k, generator=g)[:, ::2], torch.randn(k + 5, n, generator=g)[5:]
    yield "expanded row", torch.randn(1, k, generator=g).expand(m, k), b


@pytest.mark.parametrize("shape", [(256, 128, 300), (700, 64, 65), (64, 512, 2048), (3, 2, 5)])
def test_matches_float64_product(shape):
    for name, a, b in _layouts(*shape):
        exact = a.double() @ b.double()
        out = mm(a, b)
        assert out.dtype == torch.float32 and out.shape == exact.shape, name
        # float32 accumulation error grows like sqrt(K)·eps·Σ|a||b|; MKL's own torch.mm has the same bound
        bound = 1e-6 * (a.abs().double() @ b.abs().double()).max()
        assert (out.double() - exact).abs().max() <= bound, name
        assert (torch.mm(a, b).double() - exact).abs().max() <= bound, name


@needs_onednn
def test_large_float32_cpu_products_take_the_onednn_path(monkeypatch):
    calls = []
    real = matmul._onednn_mm
    monkeypatch.setattr(matmul, "_onednn_mm", lambda a, b: calls.append(a.shape) or real(a, b))
    mm(torch.randn(256, 128), torch.randn(128, 128))
    assert calls == [(256, 128)]
    mm(torch.randn(128, 128), torch.randn(128, 128))  # 2^21 multiply-adds: below MIN_WORK
    mm(torch.randn(128, 128, dtype=torch.float64), torch.randn(128, 128, dtype=torch.float64))
    assert len(calls) == 1


def test_fallbacks_are_torch_mm_exactly():
    g = torch.Generator().manual_seed(1)
    for a, b in [
        (
            torch.randn(200, 300, dtype=torch.float64, generator=g),
            torch.randn(300, 100, dtype=torch.float64, generator=g),
        ),
        (torch.randn(10, 20, generator=g), torch.randn(20, 30, generator=g)),  # tiny
        (torch.randn(5, 0), torch.randn(0, 7)),  # K = 0: zeros
        (torch.randn(0, 300), torch.randn(300, 400)),  # no rows
    ]:
        assert torch.equal(mm(a, b), torch.mm(a, b))


@needs_onednn
def test_rows_do_not_depend_on_the_chunk():
    """A row of the product is the same bits whichever rows are computed with it (row-chunked distances)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 200, generator=g), torch.randn(200, 400, generator=g)
    full = mm(a, b)
    for start, stop in [(0, 1), (0, 64), (17, 150), (150, 300)]:
        if (stop - start) * 200 * 400 >= matmul.MIN_WORK:
            assert torch.equal(mm(a[start:stop], b), full[start:stop])


@pytest.mark.parametrize(
    "a, b, message",
    [
        (torch.randn(256, 128), torch.randn(100, 300), "cannot be multiplied"),  # inner sizes differ
        (torch.randn(256, 128), torch.randn(128, 300, dtype=torch.float64), "same dtype"),
        (torch.randn(4, 256, 128), torch.randn(128, 300), "must be a matrix"),
    ],
)
def test_bad_operands_get_torch_mm_errors(a, b, message):
    """Large mismatched operands never reach oneDNN, whose error would not name the shapes."""
    with pytest.raises(RuntimeError, match=message):
        mm(a, b)


def test_backward_matches_autograd_of_torch_mm():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(256, 128, generator=g, requires_grad=True)
    b = torch.randn(300, 128, generator=g).T.requires_grad_()  # a transposed leaf view, as proxies.T
    w = torch.randn(256, 300, generator=g)
    (mm(a, b) * w).sum().backward()
    ga, gb = a.grad, b.grad
    a.grad = b.grad = None
    (torch.mm(a, b) * w).sum().backward()
    torch.testing.assert_close(ga, a.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb, b.grad, rtol=1e-5, atol=1e-4)


def test_double_backward_matches_torch_mm():
    """The backward runs through mm itself, so Hessian-vector products work (create_graph=True)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(160, 128, generator=g, requires_grad=True)
    b = torch.randn(128, 130, generator=g, requires_grad=True)

    def hvp(product):
        (ga,) = torch.autograd.grad(product(a, b).square().sum(), a, create_graph=True)
        return torch.autograd.grad(ga.sum(), b)[0]

    torch.testing.assert_close(hvp(mm), hvp(torch.mm), rtol=1e-4, atol=1e-3)


def test_float64_gradcheck():
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mm, (a, b))


def test_environment_variable_and_vendor_rule():
    assert matmul.wanted("auto", "AuthenticAMD") and matmul.wanted("", "AuthenticAMD")
    assert not matmul.wanted("auto", "GenuineIntel")  # MKL runs its AVX-512 kernels on Intel
    assert matmul.wanted("1", "GenuineIntel") and matmul.wanted(" On ", "GenuineIntel")
    assert not matmul.wanted("0", "AuthenticAMD") and not matmul.wanted("off", "")
    with pytest.raises(ValueError, match="must be 0, 1 or auto, got 'fast'"):
        matmul.wanted("fast", "AuthenticAMD")
    code = "import deepmetric.matmul as m; print(m.ONEDNN)"
    for setting, expected in [("0", False), ("1", matmul.AVAILABLE)]:
        env = {**os.environ, "DEEPMETRIC_ONEDNN": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(expected)

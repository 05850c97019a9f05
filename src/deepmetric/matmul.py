"""Matrix products of the hot paths (the losses' similarity matrices and their gradients, the evaluation's
symmetric kNN tiles): oneDNN's float32 GEMM on non-Intel x86-64 CPUs, ``torch.mm`` elsewhere.

``torch.mm`` on CPU calls MKL's sgemm, which on AMD processors runs its AVX2 kernels even where AVX-512
exists. oneDNN, which PyTorch bundles (it already runs PyTorch's CPU convolutions), picks its kernels by
instruction set, not by vendor. On a 2-core AMD EPYC (Zen 5) a 512 x 512 x 11,318 product takes 31.7 ms
through MKL (190 GFLOP/s) and 12.3 ms through oneDNN (480 GFLOP/s); products from 512 x 128 x 512 up ran
1.45-2.6x faster (``benchmarks/bench_matmul.py``, 2 threads). On an Intel Xeon, where MKL runs its own
AVX-512 kernels, oneDNN was 0.53-0.98x of MKL on the losses' products (the ``∂W = Gᵀ X`` product of
C = 11,318 proxies 0.70x; ``benchmarks/results/bench_matmul_intel_xeon.json``), so Intel CPUs keep
``torch.mm``. 128³ is as fast alone but made the SupCon step at B = 128, D = 128 20 % slower, so products
that small stay with ``torch.mm``. The values are the same float32 products summed in
another order (relative differences ~1e-6), and a row of the result does not depend on how many rows are
computed with it, so row-chunked distances stay equal to unchunked ones.

:func:`mm` takes the oneDNN path for 2-D float32 CPU operands with at least ``2**22`` multiply-adds when
:data:`ONEDNN` is on, and is differentiable there (its backward uses the same path); other dtypes (float64
stays exact MKL/LAPACK arithmetic), devices and tiny products go to ``torch.mm``. :data:`ONEDNN` is read
at import: ``DEEPMETRIC_ONEDNN=0`` turns the path off, ``=1`` turns it on wherever the op runs (Intel too),
unset (``auto``) turns it on for x86-64 CPUs whose vendor is not Intel.
"""

from __future__ import annotations

import os
import platform

import torch

MIN_WORK = 1 << 22  # m·k·n below which torch.mm is faster in a training step (oneDNN's fixed cost)


def _op_runs() -> bool:
    """Whether oneDNN's linear op exists and runs here (x86-64 with PyTorch's oneDNN)."""
    if platform.machine().lower() not in {"x86_64", "amd64"} or not torch.backends.mkldnn.is_available():
        return False
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError):  # op renamed or removed in another PyTorch release
        return False
    return out.shape == (2, 4) and bool((out == 3).all())


def _cpuinfo(key: str) -> str:
    """The first ``key`` field of /proc/cpuinfo (empty where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name (what the benchmarks record: the GEMM kernels depend on it), else the machine."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def wanted(setting: str, vendor: str) -> bool:
    """The ``DEEPMETRIC_ONEDNN`` rule: ``0``/``1`` (or off/on, false/true, no/yes) force it; ``auto`` (or
    unset) wants oneDNN where MKL would not run AVX-512 kernels, i.e. on a CPU whose vendor is not Intel."""
    setting = setting.strip().lower() or "auto"
    if setting in {"0", "false", "no", "off"}:
        return False
    if setting in {"1", "true", "yes", "on"}:
        return True
    if setting == "auto":
        return vendor != "GenuineIntel"
    raise ValueError(f"DEEPMETRIC_ONEDNN must be 0, 1 or auto, got {setting!r}")


#: Whether oneDNN's op runs here at all (whatever ``DEEPMETRIC_ONEDNN`` says).
AVAILABLE = _op_runs()
#: Whether :func:`mm` takes the oneDNN path (``DEEPMETRIC_ONEDNN``, see the module docstring).
ONEDNN = AVAILABLE and wanted(os.environ.get("DEEPMETRIC_ONEDNN", "auto"), _cpuinfo("vendor_id"))


def _fast(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        ONEDNN
        and a.dtype == b.dtype == torch.float32
        and a.device.type == b.device.type == "cpu"
        and a.dim() == b.dim() == 2
        and a.shape[1] == b.shape[0]  # mismatches go to torch.mm, whose error names the shapes
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_WORK
    )


def _onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the op computes a @ weightᵀ; any strides work (a transposed view is read in place)
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")


class _MM(torch.autograd.Function):
    """``a @ b`` by oneDNN with the backward ``∂a = G bᵀ``, ``∂b = aᵀ G`` through :func:`mm` (so the
    backward is itself differentiable)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _onednn_mm(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        ga = mm(grad, b.T) if ctx.needs_input_grad[0] else None
        gb = mm(a.T, grad) if ctx.needs_input_grad[1] else None
        return ga, gb


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for matrices ``a [M, K]``, ``b [K, N]`` (same dtype and device), the fastest way here."""
    if not _fast(a, b):
        return torch.mm(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _MM.apply(a, b)
    return _onednn_mm(a, b)

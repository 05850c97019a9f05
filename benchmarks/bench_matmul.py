"""float32 matrix products: ``torch.mm`` (MKL's sgemm: what PyTorch, and so pytorch-metric-learning, runs on
CPU) vs oneDNN's kernel (the path :func:`deepmetric.matmul.mm` takes where :data:`deepmetric.matmul.ONEDNN`
is on: by default on non-Intel x86-64 CPUs), side by side in one process, whatever this CPU's default is.

The shapes are the products of the benchmarked steps: ``B x D x B`` distance matrices of the pair losses,
``B x D x C`` sample-to-proxy cosines and their two backward products (``B x C x D``, ``C x B x D``) at
SOP's 11,318 classes, and the evaluation's ``4096 x D x 4096`` score tiles. Per shape: the minimum over
rounds of ~0.5 s of repeated products (after warm-up), alternating the two kernels, and the largest
relative difference of the results. ``--threads`` (default 2) sets ``torch.set_num_threads``.

Usage: ``python benchmarks/bench_matmul.py [--threads 2] [--out benchmarks/results/bench_matmul.json]``.
Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deepmetric import matmul

# (name, M, K, N, layout): a [M, K] @ b [K, N]; layout "bT" / "aT": the right / left operand is a transposed view
# (as in the losses: x @ w.T, g.T @ x)
SHAPES = [
    ("pair B128 D128", 128, 128, 128, "bT"),
    ("pair B512 D128", 512, 128, 512, "bT"),
    ("pair B512 D512", 512, 512, 512, "bT"),
    ("pair B2048 D512", 2048, 512, 2048, "bT"),
    ("proxy C100 D512 cosines", 512, 512, 100, "bT"),
    ("proxy C11318 D512 cosines", 512, 512, 11318, "bT"),
    ("proxy C11318 D512 dx = G W", 512, 11318, 512, ""),
    ("proxy C11318 D512 dW = G^T X", 11318, 512, 512, "aT"),
    ("evaluation tile D128", 4096, 128, 4096, "bT"),
    ("evaluation tile D512", 4096, 512, 4096, "bT"),
]


def _time(fn, budget: float = 0.5) -> float:
    """Seconds per call: the fastest of repeated calls within ``budget`` seconds."""
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_matmul.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    if not matmul.AVAILABLE:
        raise SystemExit("oneDNN's linear op does not run on this machine: nothing to compare")
    print(f"{matmul.cpu_model()}; {args.threads} threads; deepmetric.matmul.mm takes oneDNN here by default: {matmul.ONEDNN}")
    print("| product | M x K x N | torch.mm ms | oneDNN ms | torch.mm GFLOP/s | oneDNN GFLOP/s | speed-up |"
          " max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, k, n, layout in SHAPES:
        a = torch.randn(k, m, generator=g).T if layout == "aT" else torch.randn(m, k, generator=g)
        b = torch.randn(n, k, generator=g).T if layout == "bT" else torch.randn(k, n, generator=g)
        ref, ours = torch.mm(a, b), matmul._onednn_mm(a, b)
        rel = ((ours - ref).abs().max() / ref.abs().max()).item()
        t_ref, t_ours = float("inf"), float("inf")
        for _ in range(args.rounds):  # alternate, so that machine load hits both alike
            t_ref = min(t_ref, _time(lambda: torch.mm(a, b)))
            t_ours = min(t_ours, _time(lambda: matmul._onednn_mm(a, b)))
        flop = 2.0 * m * k * n
        row = {
            "product": name, "m": m, "k": k, "n": n, "torch_mm_ms": t_ref * 1e3, "onednn_ms": t_ours * 1e3,
            "torch_mm_gflops": flop / t_ref / 1e9, "onednn_gflops": flop / t_ours / 1e9,
            "speedup": t_ref / t_ours, "max_rel_diff": rel,
        }
        rows.append(row)
        print(f"| {name} | {m} x {k} x {n} | {row['torch_mm_ms']:.3f} | {row['onednn_ms']:.3f} | "
              f"{row['torch_mm_gflops']:.0f} | {row['onednn_gflops']:.0f} | {row['speedup']:.2f}x | {rel:.1e} |")
    meta = {
        "threads": args.threads, "onednn_by_default": matmul.ONEDNN, "min_work": matmul.MIN_WORK, "torch": torch.__version__,
        "machine": platform.machine(), "cpu": matmul.cpu_model(), "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Pair-based (+ miners), proxy and ranking losses: deepmetric vs pytorch-metric-learning (PML), side by side in one run.

Each case is one forward+backward step ``[miner(x, y) ->] loss(x, y[, tuples]).backward()`` on
``randn(B, D)`` leaf embeddings with labels in contiguous blocks of 4 (as an m-per-class sampler yields
them), for B in {128, 512, 2048} and D in {128, 512}. Proxy losses (the ``"classes"`` cases; their
proxies get gradients too) run for B in {128, 512}, D in {128, 512} and C in {100, 11318} classes
(CUB-like and SOP-like proxy counts; labels taken modulo C). Ranking losses (``"family": "ranking"``:
FastAP, Smooth-AP with the query kept in its retrieval set as PML and the official code do) use the pair
grid. Both libraries are configured to the same
definition (PML defaults where PML has them). Every case runs in fresh subprocesses with 2 threads
(``OMP_NUM_THREADS=2``, ``torch.set_num_threads(2)``; ``--threads`` changes it) and an address-space cap (``RLIMIT_AS``, 20 GiB),
so a blow-up is an allocation error, not the OOM killer:

* timing: one subprocess runs both libraries, alternating blocks of 5 steps (ours ×5, PML ×5, ...), so
  load from other processes on a shared machine hits both alike while the median is not disturbed by
  the other library's freed memory; 2 warm-up steps each, then the median of 5-50 steps (~3 s each;
  3 steps, one at a time, if one takes > 5 s; 1 if > 30 s). A library that fails (out of memory) is
  reported as a crash and must not take the other down: when the shared run loses a library, the other
  is re-timed alone in a fresh subprocess (each library alone if the shared process itself died, e.g.
  killed), marked ``timed_alone`` (``†`` in the table);
* memory: one subprocess per library, peak RSS growth (``ru_maxrss``) over the post-setup baseline
  during two steps (CUDA: peak allocated memory).

The parent records the share of the machine's CPU used by other processes during the timing run
(/proc/stat) and retries the run once when it exceeds 25%.

Usage::

    python benchmarks/bench_losses.py            # full grid (pair losses ~10-15 min on 2 cores)
    python benchmarks/bench_losses.py --cases proxy_anchor soft_triple   # some cases; other rows are kept
    python benchmarks/bench_losses.py --quick    # B in {128, 512}, D = 128, fewer steps
    python benchmarks/bench_losses.py --cases ntxent --batch-sizes 2048 --out /tmp/ntxent.json  # one size
    python benchmarks/bench_losses.py --device cuda --out benchmarks/results/bench_losses_cuda.json

Prints a table (ms, ratio = PML / ours, memory) and merges the rows into
benchmarks/results/bench_losses.json (rows of cases not run are kept; summaries per family, pair / proxy /
ranking).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# case -> (ours: (miner key or None, miner kwargs, loss key, loss kwargs), PML: python expressions)
CASES: dict[str, dict] = {
    "contrastive": {
        "ours": (None, {}, "contrastive", {"reduction": "avg_nonzero"}),
        "pml": (None, "losses.ContrastiveLoss()"),
    },
    "triplet_all": {
        "ours": (None, {}, "triplet", {"margin": 0.05, "distance": "euclidean", "reduction": "avg_nonzero"}),
        "pml": (None, "losses.TripletMarginLoss()"),
    },
    "triplet_semihard": {
        "ours": (
            "semi_hard",
            {"convention": "all", "margin": 0.2, "distance": "euclidean"},
            "triplet",
            {"margin": 0.05, "distance": "euclidean", "reduction": "avg_nonzero"},
        ),
        "pml": ("miners.TripletMarginMiner(type_of_triplets='semihard')", "losses.TripletMarginLoss()"),
    },
    "triplet_batch_hard": {
        "ours": (
            "batch_hard",
            {"distance": "euclidean"},
            "triplet",
            {"margin": 0.05, "distance": "euclidean", "reduction": "avg_nonzero"},
        ),
        "pml": ("miners.BatchHardMiner()", "losses.TripletMarginLoss()"),
    },
    "multi_similarity": {
        "ours": (None, {}, "multi_similarity", {}),
        "pml": ("miners.MultiSimilarityMiner()", "losses.MultiSimilarityLoss()"),
    },
    "margin_dw": {
        "ours": ("distance_weighted", {}, "margin", {"learn_beta": False}),
        "pml": ("miners.DistanceWeightedMiner()", "losses.MarginLoss()"),
    },
    "npair": {
        "ours": (None, {}, "npair", {"strict": False, "normalize": True, "l2_reg": 0.0}),
        "pml": (None, "losses.NPairsLoss()"),
    },
    "circle": {"ours": (None, {}, "circle", {}), "pml": (None, "losses.CircleLoss()")},
    "supcon": {"ours": (None, {}, "supcon", {}), "pml": (None, "losses.SupConLoss(temperature=0.1)")},
    "ntxent": {
        "ours": (None, {}, "ntxent", {"temperature": 0.07}),
        "pml": (None, "losses.NTXentLoss(temperature=0.07)"),
    },
    # proxy losses: built with num_classes C and embedding_size D ({C}, {D} in the PML expression)
    "proxy_nca": {  # PML's ProxyNCALoss is the softmax form (positive included) at temperature 1
        "classes": True,
        "ours": (None, {}, "proxy_nca_pp", {"temperature": 1.0}),
        "pml": (None, "losses.ProxyNCALoss({C}, {D}, softmax_scale=1)"),
    },
    "proxy_anchor": {
        "classes": True,
        "ours": (None, {}, "proxy_anchor", {}),
        "pml": (None, "losses.ProxyAnchorLoss({C}, {D}, margin=0.1, alpha=32)"),
    },
    "soft_triple": {  # PML has no centre regulariser: tau = 0
        "classes": True,
        "ours": (None, {}, "soft_triple", {"tau": 0.0}),
        "pml": (None, "losses.SoftTripleLoss({C}, {D}, centers_per_class=10, la=20, gamma=0.1, margin=0.01)"),
    },
    "normalized_softmax": {
        "classes": True,
        "ours": (None, {}, "normalized_softmax", {}),
        "pml": (None, "losses.NormalizedSoftmaxLoss({C}, {D}, temperature=0.05)"),
    },
    "arcface": {
        "classes": True,
        "ours": (None, {}, "arcface", {}),
        "pml": (None, "losses.ArcFaceLoss({C}, {D}, margin=28.6478897565412, scale=64)"),
    },
    "cosface": {
        "classes": True,
        "ours": (None, {}, "cosface", {}),
        "pml": (None, "losses.CosFaceLoss({C}, {D}, margin=0.35, scale=64)"),
    },
    # ranking losses (PML has no ROADMAP or stochastic AUPRC)
    "fast_ap": {"family": "ranking", "ours": (None, {}, "fast_ap", {}), "pml": (None, "losses.FastAPLoss()")},
    "smooth_ap": {  # PML's SmoothAPLoss keeps the query in its retrieval set (include_query) and is O(B³)
        "family": "ranking",
        "ours": (None, {}, "smooth_ap", {"include_query": True}),
        "pml": (None, "losses.SmoothAPLoss(temperature=0.01)"),
    },
}
PROXY_CLASSES = (100, 11318)
LIBS = ("ours", "pml")
AS_LIMIT = 20 * 2**30
THREADS = 2  # per child process (--threads)


def family(case: str) -> str:
    return CASES[case].get("family") or ("proxy" if CASES[case].get("classes") else "pair")


def _build(lib: str, case: str, device: str, dim: int, classes: int):
    if lib == "ours":
        from deepmetric import losses, miners

        miner_key, miner_kw, loss_key, loss_kw = CASES[case]["ours"]
        miner = miners.build(miner_key, **miner_kw) if miner_key else None
        sizes = {"num_classes": classes, "embedding_size": dim} if classes else {}
        loss = losses.build(loss_key, **sizes, **loss_kw)
    else:
        from pytorch_metric_learning import losses, miners  # noqa: F401  (used by eval)

        miner_expr, loss_expr = CASES[case]["pml"]
        miner = eval(miner_expr) if miner_expr else None
        loss = eval(loss_expr.format(C=classes, D=dim))
    return miner, loss.to(device)


def child(mode: str, case: str, batch: int, dim: int, device: str, quick: bool, classes: int = 0) -> dict:
    """``mode="time"``: both libraries in this process, steps interleaved (ours, PML, ours, ...) so that
    load from other processes hits both alike; median per library (``"time_ours"``/``"time_pml"``: one
    library alone). ``mode="mem_ours"``/``"mem_pml"``: one library, warm-up + one step, peak RSS growth over
    the post-setup baseline (CUDA: peak allocated)."""
    import resource

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    kind, _, only = mode.partition("_")
    libs = (only,) if only else LIBS
    built = {lib: _build(lib, case, device, dim, classes) for lib in libs}
    torch.manual_seed(0)
    x = torch.randn(batch, dim, device=device, requires_grad=True)
    y = torch.arange(batch // 4, device=device).repeat_interleave(4)
    if classes:
        y = y % classes
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(lib: str) -> float:
        miner, loss = built[lib]
        x.grad = None
        loss.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        out = loss(x, y, miner(x, y)) if miner is not None else loss(x, y)
        out.backward()
        sync()
        return time.perf_counter() - t

    if kind == "mem":
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() if cuda else 0
        step(libs[0])
        step(libs[0])
        growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
        if cuda:
            return {"mem_mb": (torch.cuda.max_memory_allocated() - base_cuda) / 2**20}
        return {"mem_mb": growth}

    first, failed = {}, {}
    for lib in libs:  # warm-up; a library that fails (e.g. out of memory) is reported, the other timed
        try:
            first[lib] = max(step(lib), step(lib))
        except (RuntimeError, MemoryError) as e:
            failed[lib] = {"error": str(e).splitlines()[0][:200]}
        x.grad = None
    running = list(first)
    slowest = max(first.values(), default=0.0)
    n = 1 if slowest > 30 else 3 if slowest > 5 else (10 if quick else 50)
    budget = (1.0 if quick else 3.0) * len(running)
    timed: dict[str, list[float]] = {lib: [] for lib in running}
    start = time.perf_counter()
    block = 5 if n >= 10 else 1  # blocks of steps: one library's freed memory barely disturbs the other
    while running and len(timed[running[0]]) < n and (
        len(timed[running[0]]) < 5 or time.perf_counter() - start < budget
    ):
        for lib in running:
            timed[lib].extend(step(lib) for _ in range(block))
    return {**{lib: {"ms": 1000 * statistics.median(v), "steps": len(v)} for lib, v in timed.items()}, **failed}


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def run_child(mode: str, case: str, batch: int, dim: int, device: str, quick: bool, classes: int = 0) -> dict:
    """Run ``child`` in a fresh interpreter (2 threads, AS cap); adds the other processes' CPU share.

    A timing run during which other processes used more than 25% of the machine is retried once."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    kind = mode.partition("_")[0]
    cmd = [sys.executable, __file__, "--child", json.dumps([mode, case, batch, dim, device, quick, classes])]
    limit = None if device.startswith("cuda") else AS_LIMIT

    def cap() -> None:
        if limit:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def children_jiffies() -> float:
        t = os.times()
        return (t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")

    for attempt in range(2):
        total0, idle0, own0 = *_cpu_jiffies(), children_jiffies()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=cap)
        out, err = proc.communicate()
        total1, idle1 = _cpu_jiffies()
        busy = (total1 - total0) - (idle1 - idle0)
        own = children_jiffies() - own0
        other = max(0.0, (busy - own) / max(total1 - total0, 1))
        if proc.returncode != 0 or not out.strip():
            last = (err.decode().strip().splitlines() or ["?"])[-1]
            return {"error": last[:200], "other_cpu_frac": round(other, 3)}
        result = json.loads(out.decode().strip().splitlines()[-1])
        result["other_cpu_frac"] = round(other, 3)
        if kind != "time" or other <= 0.25 or attempt == 1:
            return result
    return result


def time_alone(timing: dict, case: str, batch: int, dim: int, device: str, quick: bool, classes: int) -> dict:
    """The shared timing run's result with every library it lost re-timed alone in a fresh subprocess, so that
    a library that fails cannot take the other down. If one library failed (its own error), the other is
    re-timed; if the shared process died (no per-library result), each library is timed alone and the one
    that fails records its own error. Re-timed results carry ``timed_alone``."""
    died = "ours" not in timing and "pml" not in timing
    failed = [lib for lib in LIBS if "ms" not in timing.get(lib, {})]
    if not failed or (not died and len(failed) == len(LIBS)):
        return timing
    out = {k: v for k, v in timing.items() if k != "error"}
    if died:
        out["shared_error"] = timing.get("error", "no output")
    for lib in LIBS if died else [lib for lib in LIBS if lib not in failed]:
        solo = run_child(f"time_{lib}", case, batch, dim, device, quick, classes)
        mine = solo.get(lib) or {"error": solo.get("error", "no timing")}
        out[lib] = {**mine, "timed_alone": True, "other_cpu_frac": solo.get("other_cpu_frac")}
    return out


def fmt_ms(r: dict) -> str:
    if "ms" not in r:
        return "crash"
    ms = f"{r['ms']:.3g}" if r["ms"] < 100 else f"{r['ms']:.0f}"
    return ms + ("†" if r.get("timed_alone") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="B in {128, 512}, D = 128, ~1 s of steps per case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=None, help="only these B (default: the grid's)")
    ap.add_argument("--threads", type=int, default=2, help="threads per process (1: on a machine shared with other "
                    "jobs, sub-millisecond 2-thread steps mostly time waits for a core; write those to another --out)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_losses.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return

    import pytorch_metric_learning
    import torch

    from deepmetric import matmul

    rows = []
    header = "| case | B | D | C | ours ms | PML ms | PML / ours | ours MB | PML MB | other CPU |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for case in args.cases:
        for batch, dim, classes in grid(case, args.quick):
            if args.batch_sizes and batch not in args.batch_sizes:
                continue
            timing = time_alone(run_child("time", case, batch, dim, args.device, args.quick, classes),
                                case, batch, dim, args.device, args.quick, classes)
            mem = {lib: run_child(f"mem_{lib}", case, batch, dim, args.device, args.quick, classes) for lib in ("ours", "pml")}
            res = {}
            for lib in ("ours", "pml"):
                res[lib] = dict(timing.get(lib, {}), **mem[lib])
                error = mem[lib].get("error") or res[lib].get("error")
                if error or "ms" not in res[lib]:
                    res[lib]["error"] = error or "no timing"
            ours, pml = res["ours"], res["pml"]
            ratio = pml["ms"] / ours["ms"] if "ms" in ours and "ms" in pml else None
            row = {"case": case, "B": batch, "D": dim, **({"C": classes} if classes else {}),
                   "ours": ours, "pml": pml, "ratio": ratio}
            row["other_cpu_frac"] = timing.get("other_cpu_frac")
            if "shared_error" in timing:
                row["shared_run_error"] = timing["shared_error"]
            rows.append(row)
            mb = [f"{r['mem_mb']:.0f}" if "mem_mb" in r else "crash" for r in (ours, pml)]
            print(
                f"| {case} | {batch} | {dim} | {classes or '-'} | {fmt_ms(ours)} | {fmt_ms(pml)} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {mb[0]} | {mb[1]} | "
                f"{row['other_cpu_frac'] or 0:.0%} |",
                flush=True,
            )
    if any(r[lib].get("timed_alone") for r in rows for lib in LIBS):
        print("† timed alone in a fresh process: a library failed in the shared timing run")
    meta = {
        "device": args.device,
        "quick": args.quick,
        "cpu": matmul.cpu_model(),
        "cores": os.cpu_count(),
        "threads": THREADS,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    merged = merge(json.loads(out.read_text()) if out.is_file() else None, rows, meta)
    for fam, summary in merged["summary"].items():
        ratios = (f"median PML/ours {summary['median_ratio']:.2f}x over {summary['cases']} cases, "
                  f"min {summary['min_ratio']:.2f}x" if summary["cases"] else "no case with both times")
        print(f"{fam}: {ratios}; PML crashed: {summary['pml_crashes'] or 'none'}; "
              f"ours crashed: {summary['ours_crashes'] or 'none'}; timed alone: {summary['timed_alone'] or 'none'}; "
              f"ours more memory: {summary['ours_more_memory'] or 'none'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    print(f"wrote {out}")


def grid(case: str, quick: bool) -> list[tuple[int, int, int]]:
    """(B, D, C) of a case; C = 0 for pair losses."""
    dims = (128,) if quick else (128, 512)
    if family(case) == "proxy":
        return [(b, d, c) for b in ((128,) if quick else (128, 512)) for d in dims for c in PROXY_CLASSES]
    return [(b, d, 0) for b in ((128, 512) if quick else (128, 512, 2048)) for d in dims]


def row_key(row: dict) -> tuple:
    return row["case"], row["B"], row["D"], row.get("C", 0)


def summarize(rows: list[dict]) -> dict:
    def name(r: dict) -> str:
        return f"{r['case']} B{r['B']} D{r['D']}" + (f" C{r['C']}" if "C" in r else "")

    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    return {
        "cases": len(ratios),
        "median_ratio": statistics.median(ratios) if ratios else None,
        "min_ratio": min(ratios) if ratios else None,
        "pml_crashes": [name(r) for r in rows if "error" in r["pml"]],
        "ours_crashes": [name(r) for r in rows if "error" in r["ours"]],
        "timed_alone": [name(r) for r in rows if r["ours"].get("timed_alone") or r["pml"].get("timed_alone")],
        "ours_more_memory": [
            name(r) for r in rows
            if "mem_mb" in r["ours"] and "mem_mb" in r["pml"] and r["ours"]["mem_mb"] > r["pml"]["mem_mb"] + 8
        ],
    }


def merge(old: dict | None, rows: list[dict], meta: dict) -> dict:
    """The results file with ``rows`` replacing the old rows of the same (case, B, D, C); other rows are kept.
    ``meta`` and ``summary`` are per family (``pair``, ``proxy``); a family's meta is replaced when rows of it
    were run. A file written before families existed (flat ``meta``) counts as the pair family's."""
    old = old or {"meta": {}, "rows": []}
    old_meta = old.get("meta", {})
    metas = {"pair": old_meta} if "device" in old_meta else dict(old_meta)
    new_keys = {row_key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if row_key(r) not in new_keys and r["case"] in CASES]
    all_rows = kept + rows
    for fam in {family(r["case"]) for r in rows}:
        metas[fam] = meta
    families = sorted({family(r["case"]) for r in all_rows})
    return {
        "meta": {f: metas[f] for f in families if f in metas},
        "summary": {f: summarize([r for r in all_rows if family(r["case"]) == f]) for f in families},
        "rows": all_rows,
    }


if __name__ == "__main__":
    main()

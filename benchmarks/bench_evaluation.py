"""deepmetric.evaluate vs pytorch-metric-learning's AccuracyCalculator, side by side in one run.

Cases: CUB-like (5,924 items, 100 classes), SOP-like at 20,000 items (3,741 classes) and, with
``--full``, SOP-like at full size (60,502 items, 11,316 classes), at D = 128 and 512; clustered synthetic embeddings generated as in /work/shared/pml-baseline.md
("Eval data"): random unit class centres + Gaussian noise of norm 2 (D/128)^(1/4), L2-normalised.

For every case, each of these runs in its own subprocess (2 threads), which reports its time; the
parent takes the child's peak RSS from ``wait4`` and the CPU used by *other* processes meanwhile:

- ``floor``: the N x N x D float32 matrix product alone, in 4096 x 4096 tiles written into one
  preallocated buffer (no top-k, no metrics, no allocation);
- ``ours_knn`` / ``pml_knn``: recall@1/2/4/8 + r_precision + map@r vs precision_at_1 + r_precision +
  mean_average_precision_at_r (k = max_bin_count);
- ``ours_all`` / ``pml_all``: the same plus NMI and AMI (faiss k-means, 20 iterations);
- ``ours_map``: mAP over the full ranking (no PML counterpart: PML's MAP is at k).

Usage: ``python benchmarks/bench_evaluation.py`` (CUB and SOP at 20k) or ``--full`` (adds full SOP; ~10 min);
``--cases sop20k`` runs some cases only.
Merges its rows into benchmarks/results/bench_evaluation.json (rows of cases not run are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPLS = ("floor", "ours_knn", "pml_knn", "ours_all", "pml_all", "ours_map")
CASES = {"cub": (5924, 100), "sop20k": (20000, 3741), "sop": (60502, 11316)}
PML_KNN = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
OURS_KNN = ["recall@k", "r_precision", "map@r"]


def make_data(case: str, dim: int, seed: int = 0):
    import numpy as np

    n, n_classes = CASES[case]
    rng = np.random.default_rng(seed)
    if case == "cub":
        labels = np.sort(np.arange(n) % n_classes)
    else:  # two per class plus a multinomial share of the rest: sizes 2..~16, mean 5.35
        sizes = 2 + rng.multinomial(n - 2 * n_classes, np.full(n_classes, 1 / n_classes))
        labels = np.repeat(np.arange(n_classes), sizes)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, 8192):  # in blocks, so float64 temporaries do not inflate the peak RSS
        noise = rng.normal(size=(min(8192, n - i), dim))
        noise *= 2 * (dim / 128) ** 0.25 / np.linalg.norm(noise, axis=1, keepdims=True)
        block = centres[labels[i : i + 8192]] + noise
        x[i : i + 8192] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels


def child(impl: str, case: str, dim: int) -> None:
    """Run one implementation on one case and print one JSON line."""
    import resource

    import torch

    torch.set_num_threads(2)
    x, y = make_data(case, dim)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    if impl == "floor":
        out = torch.empty(4096, 4096)

        def run():  # tiles into one preallocated buffer: no allocation or page-fault cost
            for i in range(0, len(xt), 4096):
                for j in range(0, len(xt), 4096):
                    a, b = xt[i : i + 4096], xt[j : j + 4096]
                    torch.mm(a, b.T, out=out[: len(a), : len(b)])
            return {}

    elif impl.startswith("ours"):
        from deepmetric.evaluation import evaluate

        metrics = {"ours_knn": OURS_KNN, "ours_all": [*OURS_KNN, "nmi", "ami"], "ours_map": ["map"]}[impl]

        def run():
            return evaluate(x, y, metrics=metrics)

    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        include = PML_KNN + (("NMI", "AMI") if impl == "pml_all" else ())
        calc = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))

        def run():
            return calc.get_accuracy(xt, yt)

    setup_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, values = [], {}
    while len(times) < 3 and (not times or times[0] < 20):  # median of 3 when a run is under 20 s
        start = time.perf_counter()
        values = run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"time_s": statistics.median(times), "runs": len(times), "times_s": times, "setup_rss_mb": setup_rss_mb,
                      "values": {k: float(v) for k, v in values.items()}}))


def _busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def run_child(impl: str, case: str, dim: int) -> dict:
    """One case in a fresh process; peak RSS and CPU time come from ``wait4`` on the child."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    cmd = [sys.executable, __file__, "--child", impl, case, str(dim)]
    busy0, wall0 = _busy_jiffies(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{impl} {case} D={dim} failed:\n{err.read()[-2000:]}")
    wall = time.perf_counter() - wall0
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    other = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (usage.ru_utime + usage.ru_stime)
    result["other_cpu_frac"] = round(max(other, 0.0) / (wall * os.cpu_count()), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "CASE", "DIM"), help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help="also run the SOP-like case (minutes)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="only these cases (default: all but sop, "
                        "which --full adds)")
    parser.add_argument("--rounds", type=int, default=1, help="run every implementation this many times, "
                        "interleaved (fresh processes); times are medians over rounds, peak RSS the maximum")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_evaluation.json"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    cases = args.cases or (list(CASES) if args.full else ["cub", "sop20k"])
    rows = []
    for case in cases:
        for dim in args.dims:
            row = {"case": case, "n": CASES[case][0], "classes": CASES[case][1], "dim": dim, "rounds": args.rounds}
            runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
            for _ in range(args.rounds):  # ours and PML alternate, so load from other processes hits both
                for impl in IMPLS:
                    r = run_child(impl, case, dim)
                    runs[impl].append(r)
                    print(f"  {case} D={dim} {impl}: {r['time_s']:.3f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                          f"other CPU {r.get('other_cpu_frac')}", flush=True)
            for impl, rs in runs.items():
                row[impl] = {**rs[-1], "time_s": statistics.median(r["time_s"] for r in rs),
                             "round_times_s": [r["time_s"] for r in rs],
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                             "other_cpu_frac": max(r["other_cpu_frac"] for r in rs)}
            rows.append(_summarise(row))
    _print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import faiss
        import pytorch_metric_learning
        import torch

        env.update(torch=torch.__version__, faiss=faiss.__version__, pml=pytorch_metric_learning.__version__)
    except ImportError:
        pass
    new = {(r["case"], r["dim"]) for r in rows}  # rows of cases not run now are kept
    kept = [r for r in json.loads(out.read_text())["cases"] if (r["case"], r["dim"]) not in new] if out.is_file() else []
    order = list(CASES)
    merged = sorted(kept + rows, key=lambda r: (order.index(r["case"]), r["dim"]))
    out.write_text(json.dumps({"env": env, "cases": merged}, indent=2) + "\n")
    print(f"wrote {out}")


def _summarise(row: dict) -> dict:
    ours, pml = row["ours_knn"]["values"], row["pml_knn"]["values"]
    pairs = {"recall@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r"}
    row["max_abs_diff_vs_pml"] = max(abs(ours[a] - pml[b]) for a, b in pairs.items())
    row["speedup_knn"] = row["pml_knn"]["time_s"] / row["ours_knn"]["time_s"]
    row["speedup_all"] = row["pml_all"]["time_s"] / row["ours_all"]["time_s"]
    row["ours_knn_x_floor"] = row["ours_knn"]["time_s"] / row["floor"]["time_s"]
    return row


def _print_table(rows: list[dict]) -> None:
    head = ("case", "D", "floor s", "ours kNN s", "PML kNN s", "speedup", "x floor", "ours all s", "PML all s",
            "speedup", "ours mAP s", "peak RSS ours/PML MB", "RSS growth ours/PML MB", "max |diff|")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = (
            r["case"], r["dim"], f"{r['floor']['time_s']:.2f}", f"{r['ours_knn']['time_s']:.2f}",
            f"{r['pml_knn']['time_s']:.2f}", f"{r['speedup_knn']:.1f}x", f"{r['ours_knn_x_floor']:.2f}",
            f"{r['ours_all']['time_s']:.2f}", f"{r['pml_all']['time_s']:.2f}", f"{r['speedup_all']:.1f}x",
            f"{r['ours_map']['time_s']:.2f}",
            f"{max(r[i]['peak_rss_mb'] for i in ('ours_knn', 'ours_all')):.0f} / "
            f"{max(r[i]['peak_rss_mb'] for i in ('pml_knn', 'pml_all')):.0f}",
            f"{max(r[i]['peak_rss_mb'] - r[i]['setup_rss_mb'] for i in ('ours_knn', 'ours_all')):.0f} / "
            f"{max(r[i]['peak_rss_mb'] - r[i]['setup_rss_mb'] for i in ('pml_knn', 'pml_all')):.0f}",
            f"{r['max_abs_diff_vs_pml']:.1e}",
        )
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()

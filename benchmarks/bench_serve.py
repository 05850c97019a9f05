"""Load test of ``deepmetric serve`` on 127.0.0.1: concurrent searches by upload and by id, bounded.

The server runs as ``deepmetric serve`` does (``create_app`` + uvicorn, one process, spawned) on a free
127.0.0.1 port; nothing else is contacted. The index is ``--index DIR`` or, by default, a digits run trained
for 10 epochs (~10 s) with its test split (896 items) embedded and indexed. For each mode (``upload``: a
gallery item's PNG as multipart; ``id``: a gallery item's id as JSON) it fires ``--requests`` searches
(k = 8) with at most ``--concurrency`` in flight from one ``httpx.AsyncClient``, each bounded by
``--timeout`` seconds and the whole round by ``--budget`` seconds. Every answer is compared with the same
search made one at a time before the load: an error is a non-200 status, a transport failure or timeout,
or an answer that differs. ``--lock on off`` (default both) also serves without the app's lock around
embedding and search, to measure what it costs or saves.

Usage::

    python benchmarks/bench_serve.py                       # 200 concurrent per mode, lock on and off
    python benchmarks/bench_serve.py --index runs/index --requests 500 --concurrency 100 --lock on

Prints a table (requests, errors, latency p50/p95/p99/max, wall time, throughput) and writes
benchmarks/results/bench_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
K = 8
DISTINCT = 64  # distinct query items per mode, cycled over the requests


def build_index(folder: Path) -> Path:
    """A digits run (10 epochs), its test split embedded and indexed into ``folder / 'index'``."""
    from deepmetric.product import SearchIndex, embed_data, load_embedder
    from deepmetric.training import Trainer, load

    Trainer(load(None, ["train.epochs=10", "eval.tsne=false", "eval.ks=[1]"]), folder / "run", progress=False).fit()
    return SearchIndex.from_embeddings(embed_data(load_embedder(folder / "run", device="cpu"))).save(folder / "index")


def serve(index: str, port: int, lock: bool) -> None:
    """The server process: the app of ``deepmetric serve``, optionally without its lock."""
    import uvicorn

    from deepmetric.product.serve import create_app

    app = create_app(index, device="cpu")
    if not lock:
        app.state.service.lock = contextlib.nullcontext()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries(index_dir: Path) -> dict[str, list[tuple[str, dict]]]:
    """Per mode, ``DISTINCT`` (item, request keywords) pairs spread over the gallery."""
    from deepmetric.product import SearchIndex

    index = SearchIndex.load(index_dir)
    step = max(1, len(index) // DISTINCT)
    items = index.ids[::step][:DISTINCT]
    uploads = []
    for item in items:
        buffer = io.BytesIO()
        index.image(item).save(buffer, format="PNG")
        uploads.append((item, {"files": {"file": (f"{item}.png", buffer.getvalue(), "image/png")},
                               "data": {"k": str(K)}}))
    return {"upload": uploads, "id": [(item, {"json": {"id": item, "k": K}}) for item in items]}


async def one(client: httpx.AsyncClient, kw: dict, expected, gate: asyncio.Semaphore, timeout: float):
    async with gate:
        start = time.perf_counter()
        try:
            response = await client.post("/search", timeout=timeout, **kw)
            ok = response.status_code == 200 and (expected is None or response.json()["hits"] == expected)
            failure = None if ok else f"status {response.status_code}" if response.status_code != 200 else "differs"
        except httpx.HTTPError as exc:
            failure = type(exc).__name__
        return time.perf_counter() - start, failure


async def load_round(url: str, mode: str, work: list[tuple[str, dict]], expected: dict, args) -> dict:
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        jobs = [one(client, work[i % len(work)][1], expected[work[i % len(work)][0]], gate, args.timeout)
                for i in range(args.requests)]
        start = time.perf_counter()
        try:
            results = await asyncio.wait_for(asyncio.gather(*jobs), args.budget)
        except asyncio.TimeoutError:
            return {"mode": mode, "requests": args.requests, "errors": args.requests, "failures": {"budget": 1}}
        wall = time.perf_counter() - start
    latencies = sorted(1000 * t for t, _ in results)
    failures: dict[str, int] = {}
    for _, failure in results:
        if failure:
            failures[failure] = failures.get(failure, 0) + 1
    cut = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"mode": mode, "requests": len(results), "concurrency": args.concurrency, "errors": sum(failures.values()),
            "failures": failures, "p50_ms": round(cut[49], 1), "p95_ms": round(cut[94], 1),
            "p99_ms": round(cut[98], 1), "max_ms": round(latencies[-1], 1), "wall_s": round(wall, 2),
            "throughput_rps": round(len(results) / wall, 1)}


def sequential(url: str, work: list[tuple[str, dict]]) -> tuple[dict, float]:
    """Each query once, one at a time: the expected answers and the median latency (ms)."""
    answers, times = {}, []
    with httpx.Client(base_url=url, timeout=30) as client:
        for item, kw in work:
            start = time.perf_counter()
            response = client.post("/search", **kw)
            times.append(1000 * (time.perf_counter() - start))
            response.raise_for_status()
            answers[item] = response.json()["hits"]
    return answers, round(statistics.median(times), 1)


def wait_ready(url: str, process, budget: float = 120) -> None:
    deadline = time.time() + budget
    while time.time() < deadline:
        if not process.is_alive():
            raise SystemExit(f"the server process exited with code {process.exitcode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {budget} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="index folder (default: train a digits run and index it)")
    parser.add_argument("--requests", type=int, default=200, help="searches per mode")
    parser.add_argument("--concurrency", type=int, default=200, help="searches in flight at most")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per round of --requests")
    parser.add_argument("--lock", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per setting and mode, alternating settings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_serve.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        index_dir = args.index or build_index(Path(tmp))
        work = queries(index_dir)
        count = json.loads((Path(index_dir) / "metadata.json").read_text())["count"]
        rows, load_before = [], os.getloadavg()
        servers = {}
        try:
            for lock in args.lock:  # one server per setting, all up at once: rounds alternate between them
                port = free_port()
                process = multiprocessing.get_context("spawn").Process(target=serve, args=(str(index_dir), port, lock == "on"))
                process.start()
                servers[lock] = (f"http://127.0.0.1:{port}", process)
            for url, process in servers.values():
                wait_ready(url, process)
            for repeat in range(args.repeats):
                for lock in args.lock if repeat % 2 == 0 else args.lock[::-1]:
                    url = servers[lock][0]
                    for mode, items in work.items():
                        expected, single_ms = sequential(url, items)
                        row = asyncio.run(load_round(url, mode, items, expected, args))
                        rows.append({"lock": lock, "repeat": repeat, **row, "sequential_p50_ms": single_ms})
        finally:
            for _, process in servers.values():
                process.terminate()
                process.join(10)

    header = f"{'lock':>4} {'rep':>3} {'mode':>6} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} " \
             f"{'max ms':>8} {'wall s':>7} {'req/s':>7} {'alone p50 ms':>12}"
    print(header)
    for r in rows:
        print(f"{r['lock']:>4} {r['repeat']:>3} {r['mode']:>6} {r['requests']:>8} {r['errors']:>6} {r.get('p50_ms', 0):>8} "
              f"{r.get('p95_ms', 0):>8} {r.get('p99_ms', 0):>8} {r.get('max_ms', 0):>8} {r.get('wall_s', 0):>7} "
              f"{r.get('throughput_rps', 0):>7} {r['sequential_p50_ms']:>12}")
    summary = []
    for lock in args.lock:
        for mode in work:
            mine = [r for r in rows if r["lock"] == lock and r["mode"] == mode]
            rates = [r.get("throughput_rps", 0.0) for r in mine]
            summary.append({"lock": lock, "mode": mode, "requests": sum(r["requests"] for r in mine),
                            "errors": sum(r["errors"] for r in mine),
                            "throughput_rps": {"median": round(statistics.median(rates), 1), "min": min(rates), "max": max(rates)},
                            "p50_ms_median": round(statistics.median(r.get("p50_ms", 0.0) for r in mine), 1),
                            "p99_ms_median": round(statistics.median(r.get("p99_ms", 0.0) for r in mine), 1),
                            "sequential_p50_ms_median": round(statistics.median(r["sequential_p50_ms"] for r in mine), 1)})
    print("\nover the repeats (median; throughput min-max):")
    for r in summary:
        t = r["throughput_rps"]
        print(f"  lock {r['lock']:>3} {r['mode']:>6}: {r['requests']} requests, {r['errors']} errors, "
              f"{t['median']} req/s ({t['min']}-{t['max']}), p50 {r['p50_ms_median']} ms, p99 {r['p99_ms_median']} ms")
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                          "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]},
              "settings": {"k": K, "gallery_items": count, "distinct_queries": DISTINCT, "requests": args.requests,
                           "concurrency": args.concurrency, "repeats": args.repeats, "timeout_s": args.timeout, "budget_s": args.budget},
              "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if any(r["errors"] for r in rows):
        raise SystemExit("errors under load: see the table")


if __name__ == "__main__":
    main()

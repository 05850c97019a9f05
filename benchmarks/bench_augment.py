"""Training-step overhead of the embedding augmenters and of fixed-representative batches (CPU).

Every case is the real :meth:`deepmetric.training.Trainer._step` (model forward, sampler bookkeeping,
[augmenter], pair rule + [miner], objective, backward, optimiser step) on batches of B = 120 (30 classes x 4)
drawn by the configured sampler from 100 classes x 20 random 2048-d features, through a two-layer model
(``Linear(2048, 1024) + ReLU`` backbone, ``Linear(1024, 512)`` head, L2-normalised: D = 512). That is a light
step (training a head on frozen features), so the percentages are upper bounds of what an image backbone
would see; the milliseconds are the cost of the method itself. Each case is compared with its base loss
without augmentation (``multi_similarity`` for the pair-based methods, ``normalized_softmax`` for the
proxy-based ones) in alternating blocks of 5 steps (plain x5, method x5, ...), so load from other processes
hits both alike; medians over the steps. The sampler's own time per batch is measured separately (it runs
while the previous batch trains only with data-loader workers). IAA's estimation pass (one embedding pass over
the training set every 4 epochs) is not part of the step and not timed.

    python benchmarks/bench_augment.py [--steps 40] [--threads 2]

Prints a table and writes benchmarks/results/bench_augment.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepmetric.models import BACKBONES
from deepmetric.training import Trainer, load

B, M, D, F_IN, WIDTH, C, PER_CLASS = 120, 4, 512, 2048, 1024, 100, 20
PAIR, PROXY = "multi_similarity", "normalized_softmax"
CASES = {  # name -> (base loss, overrides)
    "das": (PAIR, ["augment.name=das"]),
    "iaa": (PAIR, ["augment.name=iaa"]),
    "embedding_expansion": (PAIR, ["augment.name=embedding_expansion"]),
    "fixed_representatives": (PAIR, ["sampler.name=fixed_representatives", "sampler.lifetime=10", "sampler.mining=true",
                                     f"objective=[{{name: {PAIR}}}, {{name: proximal, weight: 2.0e-4}}]"]),
    "proxy_synthesis": (PROXY, ["augment.name=proxy_synthesis"]),
    "novel_classes": (PROXY, ["augment.name=novel_classes"]),
}


@BACKBONES.register("bench_mlp")
def bench_mlp(in_features: int = F_IN, width: int = WIDTH) -> nn.Module:
    """``Linear(in_features, width) + ReLU`` with ``num_features``: a stand-in for a frozen-feature backbone."""
    model = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
    model.num_features = width
    return model


def make_trainer(root: Path, name: str, loss: str, overrides: list[str]) -> Trainer:
    base = ["data.name=features", f"data.root={root / 'feats.npz'}", "model.backbone=bench_mlp",
            f"model.embedding_size={D}", f"sampler.batch_size={B}", f"sampler.m={M}", "device=cpu", "eval.tsne=false"]
    if not any(o.startswith("objective=") for o in overrides):
        base.append(f"loss.name={loss}")
    trainer = Trainer(load(None, base + overrides), root / "runs" / name, overwrite=True, progress=False)
    trainer.model.train()
    trainer.objective.train()
    if trainer.augmenter is not None:
        trainer.augmenter.train()
        trainer.augmenter.on_train_start(trainer)  # IAA: the estimation pass that precedes synthesis
    return trainer


def batches(trainer: Trainer, n: int) -> list:
    out, pass_ = [], 0
    while len(out) < n:
        trainer.sampler.set_epoch(1, pass_)
        out += [trainer.loader.collate_fn([trainer.loader.dataset[i] for i in b]) for b in trainer.sampler]
        pass_ += 1
    return out[:n]


def sampler_ms(trainer: Trainer, n: int = 200) -> float:
    trainer.sampler.set_epoch(1)
    it, times = iter(trainer.sampler), []
    for _ in range(n):
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(trainer.sampler)
            next(it)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_pair(plain: Trainer, method: Trainer, steps: int, block: int = 5) -> tuple[float, float]:
    data = {id(plain): batches(plain, steps + 2), id(method): batches(method, steps + 2)}
    times: dict[int, list[float]] = {id(plain): [], id(method): []}
    for tr in (plain, method):  # warm-up
        for x, y, ids in data[id(tr)][:2]:
            tr._step(x, y, ids, 1)
    for start in range(2, steps + 2, block):
        for tr in (plain, method):
            for x, y, ids in data[id(tr)][start : start + block]:
                t = time.perf_counter()
                tr._step(x, y, ids, 1)
                times[id(tr)].append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[id(plain)]), 1e3 * statistics.median(times[id(method)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_augment.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        labels = np.repeat(np.arange(C), PER_CLASS)
        feats = rng.standard_normal((len(labels), F_IN)).astype(np.float32)
        np.savez(root / "feats.npz", train_features=feats, train_labels=labels, test_features=feats[:200],
                 test_labels=labels[:200])
        plain = {loss: make_trainer(root, loss, loss, []) for loss in (PAIR, PROXY)}
        rows = []
        for name in args.cases:
            loss, overrides = CASES[name]
            torch.manual_seed(0)
            method = make_trainer(root, name, loss, overrides)
            base_ms, ms = time_pair(plain[loss], method, args.steps)
            rows.append({"augmenter": name, "base_loss": loss, "plain_ms": round(base_ms, 2), "ms": round(ms, 2),
                         "overhead_ms": round(ms - base_ms, 2), "overhead_pct": round(100 * (ms - base_ms) / base_ms, 1),
                         "sampler_ms": round(sampler_ms(method), 3), "plain_sampler_ms": round(sampler_ms(plain[loss]), 3)})
            r = rows[-1]
            print(f"{name:<22} {loss:<19} plain {r['plain_ms']:7.2f} ms  with {r['ms']:7.2f} ms  "
                  f"overhead {r['overhead_ms']:+7.2f} ms ({r['overhead_pct']:+6.1f}%)  sampler {r['sampler_ms']:.3f} ms "
                  f"(plain {r['plain_sampler_ms']:.3f})", flush=True)
    result = {"setup": {"batch": B, "m": M, "embedding_size": D, "features": F_IN, "width": WIDTH, "classes": C,
                        "threads": args.threads, "steps": args.steps, "torch": torch.__version__,
                        "machine": platform.processor() or platform.machine()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

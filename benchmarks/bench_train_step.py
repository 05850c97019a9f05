"""Metric-learning overhead of a training step: the trainer's full step against the bare backbone.

``full`` is the real :meth:`deepmetric.training.Trainer._step` (backbone, embedding head and L2
normalisation, multi-similarity miner and loss, backward, AdamW step, schedule) on a batch of B images
(B/4 classes x 4). ``bare`` is the same backbone module alone: forward, backward of a fixed random gradient of its
output (contiguous, as a loss's would be; ``sum()``'s expanded one slows the backward) and an AdamW step over
its parameters (the work any training of that network does); ``fwd+bwd`` is the backbone's forward
and backward without the optimiser. The metric-learning overhead is ``(full - bare) / full``: the head,
normalisation, miner, loss and the trainer's bookkeeping (goal: at most 10 %). The three are timed
round-robin (one step of each in turn) after 3 warm-up steps each, so load from other processes hits them
alike; medians and quartiles over the steps (CUDA: synchronised around each step). ``--clock process``
(the CPU default) times the process's CPU time instead of the wall clock: on a machine shared with other
work it counts only this process's computing (use it with ``--threads 1``: spinning thread pools count too). Random images and labels; no download
(randomly initialised weights time the same as pretrained ones).

    python benchmarks/bench_train_step.py                       # CPU small scale: resnet18, 96 px, B = 32
    python benchmarks/bench_train_step.py --device cuda --backbone resnet50 --image-size 224 --batch-size 120 --amp bf16

Prints a table and adds the setting's row to benchmarks/results/bench_train_step.json.
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

from deepmetric.training import Trainer, load

M = 4  # samples per class in a batch
RESULTS = Path(__file__).parent / "results" / "bench_train_step.json"


def make_trainer(root: Path, args: argparse.Namespace) -> Trainer:
    classes = args.batch_size // M
    labels = np.repeat(np.arange(classes), M)
    np.savez(root / "feats.npz", train_features=np.zeros((len(labels), 1), np.float32), train_labels=labels,
             test_features=np.zeros((len(labels), 1), np.float32), test_labels=labels)
    overrides = [
        "data.name=features", f"data.root={root / 'feats.npz'}", f"model.backbone={args.backbone}",
        f"model.embedding_size={args.embedding_size}", f"sampler.batch_size={args.batch_size}", f"sampler.m={M}",
        "loss.name=multi_similarity", "miner.name=multi_similarity", f"device={args.device}",
        f"train.amp={args.amp}", "eval.tsne=false",
    ]
    return Trainer(load(None, overrides), root / "run", progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18", help="model.backbone (a timm name, or timm:/tv: prefixed)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32, help="a multiple of 4 (B/4 classes x 4)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--amp", default="false", help="train.amp: false, bf16 or fp16 (CUDA)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "process"], default=None,
                        help="wall clock, or this process's CPU time (default: process on CPU, wall on CUDA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp), args)
        device = trainer.device
        backbone = trainer.model.backbone
        bare_opt = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=1e-6)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.as_tensor(np.repeat(np.arange(args.batch_size // M), M))
        ids = torch.arange(args.batch_size)
        trainer.model.train()
        with torch.no_grad():
            grad_out = torch.randn_like(backbone(x).float())

        def backbone_step(with_optimizer: bool) -> None:
            bare_opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
                out = backbone(x)
            out.float().backward(grad_out)
            if with_optimizer:
                bare_opt.step()

        kinds = {
            "fwd+bwd": lambda: backbone_step(False),
            "bare": lambda: backbone_step(True),
            "full": lambda: trainer._step(x, y, ids, epoch=1),
        }
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        args.clock = args.clock or ("wall" if device.type == "cuda" else "process")
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for fn in kinds.values():
            for _ in range(3):
                fn()
        sync()
        for _ in range(args.steps):
            for kind, fn in kinds.items():
                start = clock()
                fn()
                sync()
                times[kind].append(clock() - start)

    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    quartiles = {k: [round(1000 * q, 2) for q in statistics.quantiles(v, n=4)[::2]] for k, v in times.items()}
    overhead = (ms["full"] - ms["bare"]) / ms["full"]
    paired = [(f - b) / f for f, b in zip(times["full"], times["bare"])]  # the same round's steps
    paired_q = statistics.quantiles(paired, n=4)
    name = f"{device.type}-{args.backbone.split(':')[-1]}-{args.image_size}px-b{args.batch_size}-amp_{args.amp}"
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "embedding_size": args.embedding_size, "amp": args.amp, "steps": args.steps, "clock": args.clock,
        "median_ms": {k: round(v, 2) for k, v in ms.items()}, "quartiles_ms": quartiles, "overhead": round(overhead, 4),
        "overhead_paired": {"median": round(statistics.median(paired), 4), "quartiles": [round(paired_q[0], 4),
                                                                                         round(paired_q[2], 4)]},
        "overhead_vs_fwd_bwd": round((ms["full"] - ms["fwd+bwd"]) / ms["full"], 4),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print(f"{name}: ms per step ({args.clock} clock) over {args.steps} round-robin steps: median [quartiles]")
    for kind, label in (("fwd+bwd", "backbone fwd+bwd"), ("bare", "bare: backbone fwd+bwd+AdamW"),
                        ("full", "full deepmetric step (MS + miner)")):
        print(f"  {label:<34}{ms[kind]:10.1f}  [{quartiles[kind][0]:.1f}, {quartiles[kind][1]:.1f}]")
    print(f"  metric-learning overhead (full - bare) / full: {100 * overhead:.1f} % (medians); paired by round "
          f"{100 * statistics.median(paired):.1f} % [{100 * paired_q[0]:.1f}, {100 * paired_q[2]:.1f}]")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[name] = row
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

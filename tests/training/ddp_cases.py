"""What each rank of ``test_distributed.py`` runs (a plain module, so spawned children import it by name).

``run(rank, world, port, out)`` joins a gloo group of ``world`` processes on 127.0.0.1:``port``, runs every
``TASKS[task](out/task, rank, world)`` and saves its result to ``out/<task>/rank<r>.pt``. The same functions with
``world = 1`` (no group) give the single-process reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepmetric import distributed
from deepmetric.hooks import Hook
from deepmetric.training import Trainer, load

#: SGD without momentum or decay, a constant rate, tiny CNN: updates are a fixed multiple of the gradients
BASE = ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0", "optimizer.weight_decay=0",
        "schedule.name=constant", "sampler.batch_size=16", "sampler.m=4", "train.amp=false",
        "model.embedding_size=16", "model.backbone_kwargs={width: 8}", "eval.tsne=false", "eval.ks=[1,2]"]

#: one loss of each family (learnable margin β, proxies, ranking, XBM with a miner, per-sample state,
#: regularisers on raw embeddings and on a teacher's, a deep ensemble), and the epoch each is evaluated at
CASES = {
    "pair_margin": (["loss.name=margin"], 1),
    "proxy_anchor": (["loss.name=proxy_anchor"], 1),
    "ranking_smooth_ap": (["loss.name=smooth_ap"], 1),
    "xbm_multi_similarity": (["loss.name=multi_similarity", "miner.name=multi_similarity", "memory.size=48"], 1),
    "auprc_state": (["loss.name=auprc"], 1),
    "sec_lsd": (["objective=[{name: contrastive}, {name: sec, weight: 0.5}, {name: lsd, alpha: 50}]"], 2),
    "members_margin": (["loss.name=margin", "model.members=2"], 1),  # a deep ensemble: one margin loss per network
}
STEPS = 3


class Stop(Exception):
    """Raised by :class:`StopAt` to cut a run short."""


class StopAt(Hook):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise Stop


def global_batch(trainer: Trainer, world: int = 2, per_rank: int = 16):
    """``world`` blocks of 4 classes x 4 unaugmented training images: ``(x, labels, data-set indices)``."""
    data = trainer.unaugmented_train()
    ids = []
    for block in range(world):
        for c in range(block, block + per_rank // 4):
            ids += np.flatnonzero(data.labels == c)[4 * block : 4 * block + 4].tolist()
    x = torch.stack([data[i][0] for i in ids])
    return x, torch.as_tensor(data.labels[ids]), torch.as_tensor(ids)


def gradients(out: Path, rank: int, world: int) -> dict:
    """Per case: ``STEPS`` steps on this rank's rows of the fixed global batch; each step's loss and the
    gradients of every parameter (model and objective), then the objective's and memory's state."""
    results = {}
    for name, (overrides, epoch) in CASES.items():
        trainer = Trainer(load(None, BASE + overrides), out / name, progress=False)
        for m in trainer.model.modules():  # batch statistics are per rank on CPU: use running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        x, y, ids = global_batch(trainer)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        steps = []
        for _ in range(STEPS):
            loss, _ = trainer._forward_backward(x[rows], y[rows], ids[rows], epoch)
            params = {f"model.{n}": p for n, p in trainer.model.named_parameters()}
            params.update({f"objective.{n}": p for n, p in trainer.objective.named_parameters()})
            steps.append((loss, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
            trainer._update()
        results[name] = {"steps": steps, "objective": trainer.objective.state_dict(),
                         "memory": trainer.memory.state_dict() if trainer.memory is not None else None}
    return results


FIT = ["train.epochs=3", "train.iterations_per_epoch=3", "sampler.batch_size=32", "sampler.m=8",
       "loss.name=contrastive", "miner.name=batch_hard", "memory.size=64", "eval.tsne=false", "eval.ks=[1,2]",
       "model.backbone_kwargs={width: 8}", "train.amp=false"]


def fit(out: Path, rank: int, world: int) -> dict:
    """A 3-epoch run, the same run stopped before epoch 3 and resumed, and their final states."""
    cfg = load(None, FIT)
    full = Trainer(cfg, out / "full", progress=False)
    full.fit()
    try:
        Trainer(cfg, out / "cut", hooks=[StopAt(3)], progress=False).fit()
    except Stop:
        pass
    resumed = Trainer(cfg, out / "cut", resume=True, progress=False)
    resumed.fit()
    return {"full": full.model.state_dict(), "resumed": resumed.model.state_dict(),
            "full_memory": full.memory.state_dict(), "resumed_memory": resumed.memory.state_dict(),
            "objective": resumed.objective.state_dict()}


TASKS = {"gradients": gradients, "fit": fit}


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for task, fn in TASKS.items():
            (Path(out) / task).mkdir(exist_ok=True)
            torch.save(fn(Path(out) / task, rank, world), Path(out) / task / f"rank{rank}.pt")
    finally:
        distributed.shutdown()

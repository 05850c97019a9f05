"""The training loop: plain, with explicit hooks, exact resume and honest checkpoint selection.

One epoch = the sampler's batches (or ``train.iterations_per_epoch``). After every ``eval_every``
epochs the model is evaluated on the validation classes (if any) and on the test classes; the
reported checkpoint is chosen by ``train.select_metric`` on the split ``train.select_on`` names
(validation classes carved from the training classes by default when ``data.val_classes`` is set;
never the test classes unless asked, and then every report says so).

Under ``torchrun`` (``train.distributed``) the model is wrapped in DistributedDataParallel, each rank
trains on its share of the sampler's batches (:class:`~deepmetric.samplers.DistributedBatchSampler`), and
the objective, miner, augmenter, memory and sampler state see the global batch on every rank
(:mod:`deepmetric.distributed`); the loss stage draws its random numbers from a generator seeded by the
step, the same on every rank. Evaluation is sharded; rank 0 computes the metrics and writes the run folder.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from deepmetric import augment, distributed, evaluation, samplers
from deepmetric.data.base import MetricDataset
from deepmetric.errors import ConfigError, TrainingDivergedError
from deepmetric.hooks import Hook
from deepmetric.memory import CrossBatchMemory
from deepmetric.pairing import pair_indices
from deepmetric.step import StepInputs
from deepmetric.training import checkpoint, runfolder
from deepmetric.training.build import (build_hooks, build_miner, build_model, build_splits, check_components,
                                       resolve_amp, resolve_device, resolve_distributed, unaugmented)
from deepmetric.training.config import RunConfig, dump
from deepmetric.training.evaluate_run import embed_test, score_test
from deepmetric.training.objective import build_objective
from deepmetric.training.optim import build_optimizer, build_scheduler


class _Indexed(torch.utils.data.Dataset):
    """Items ``(input, label, index)``: the data-set index of each sample travels with its batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        return x, y, index


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """Train ``config`` into the run folder ``out``. ``fit()`` returns the summary dict (also ``summary.json``)."""

    def __init__(
        self,
        config: RunConfig,
        out: str | Path,
        hooks: Sequence[Hook] = (),
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        baselines: dict[str, dict[str, float]] | None = None,
    ):
        check_components(config)
        self.config, self.out = config, Path(out)
        self.hooks = build_hooks(config) + list(hooks)
        self.baselines = dict(baselines or {})  # name -> test metrics of reference embeddings (e.g. raw pixels)
        ddp = resolve_distributed(config.train.distributed)
        self.device = resolve_device(config.device, distributed=ddp)
        if ddp:
            distributed.init(self.device.type)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.progress = progress and self.rank == 0
        if self.rank == 0:
            runfolder.prepare(self.out, resume=resume, overwrite=overwrite)
        distributed.barrier()
        self.resume = resume
        seed_everything(config.seed + self.rank, config.deterministic)  # input augmentation differs by rank

        self.splits = build_splits(config)
        train_labels = torch.as_tensor(self.splits.train.labels)
        classes = torch.unique(train_labels)
        # losses index proxies by label: map the training classes to 0..C-1
        self.label_map = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
        self.label_map[classes] = torch.arange(classes.numel())
        self.sampler = samplers.from_config(config, train_labels.numpy())
        if self.world_size > 1:
            self.sampler = samplers.DistributedBatchSampler(self.sampler, self.rank, self.world_size)
        self.loader = DataLoader(
            _Indexed(self.splits.train), batch_sampler=self.sampler, num_workers=config.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=config.data.num_workers > 0,
        )
        self.iters_per_epoch = config.train.iterations_per_epoch or len(self.sampler)

        self.model = build_model(config).to(self.device)
        if self.world_size > 1 and self.device.type == "cuda":  # batch statistics of the global batch, as one process
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.objective = build_objective(config, num_classes=classes.numel(), num_samples=len(self.splits.train),
                                         model=self.model).to(self.device)
        self.miner = build_miner(config)
        self.augmenter = augment.from_config(config, num_classes=classes.numel())
        if self.augmenter is not None:
            self.augmenter.to(self.device)
        self.memory = (CrossBatchMemory(config.memory.size, config.model.embedding_size).to(self.device)
                       if config.memory.size else None)
        self.optimizer = build_optimizer(self.model, self.objective, config.optimizer, self.augmenter)
        total = config.train.epochs * self.iters_per_epoch
        self.scheduler = build_scheduler(self.optimizer, total, self.iters_per_epoch, config.schedule)
        self.amp_dtype = resolve_amp(config.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        # what runs the training forward: the model, or its DDP wrapper (rank 0's weights, gradients averaged);
        # the loss and augmenter parameters see the global batch on every rank; _forward_backward averages them
        self.train_model: torch.nn.Module = self.model
        in_model = {id(p) for p in self.model.parameters()}
        self.shared_params = [p for p in [*self.objective.parameters(), *(self.augmenter.parameters() if self.augmenter
                                                                          else [])] if id(p) not in in_model]
        if self.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            for module in (self.objective, self.augmenter, self.memory):
                if module is not None:
                    distributed.broadcast_state(module)

        select_on = config.train.select_on
        if select_on == "auto":
            select_on = "val" if self.splits.val is not None else "last"
        if select_on == "val" and self.splits.val is None:
            raise ConfigError("train.select_on=val needs a validation split: set data.val_classes (e.g. 2 or 0.2)")
        self.select_on = select_on
        self.epoch = 0  # completed epochs
        self.best: dict[str, Any] | None = None

    def unaugmented_train(self) -> MetricDataset:
        """The training split (same items, same order) without random input augmentation."""
        return unaugmented(self.config, self.splits.train)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of the current model on the validation split (if any) and the test split."""
        return self._evaluate()[0]

    def _evaluate(self) -> tuple[dict[str, dict[str, float]], tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`evaluate`, plus the test (or gallery) embeddings and labels it computed. In a distributed
        run each rank embeds its shard of every split; rank 0 computes the metrics and sends them to all."""
        cfg = self.config.eval
        distributed.broadcast_state(self.model, buffers_only=True)  # BatchNorm statistics: rank 0's, as checkpointed
        embedder = lambda ds: distributed.embed_sharded(self.model, ds, cfg.batch_size, self.device, amp=self.amp_dtype)  # noqa: E731
        val = embedder(self.splits.val) if self.splits.val is not None else None
        query, test_embeddings = embed_test(self.splits, embedder)
        results: dict[str, dict[str, float]] = {}
        if self.rank == 0:
            if val is not None:
                results["val"] = evaluation.evaluate(*val, ks=tuple(cfg.ks), distance=cfg.distance)
            results["test"] = score_test(query, test_embeddings, cfg)
        results = distributed.broadcast_object(results)
        for split, metrics in results.items():
            if self.config.train.select_metric not in metrics:
                raise ConfigError(
                    f"train.select_metric {self.config.train.select_metric!r} is not computed; "
                    f"available: {', '.join(sorted(metrics))}"
                )
        return results, test_embeddings

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "config": self.config.model_dump(mode="json"),
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "augmenter": self.augmenter.state_dict() if self.augmenter is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "rng_ranks": distributed.all_gather_object(checkpoint.rng_state()) if self.world_size > 1 else None,
            "best": self.best,
            "hooks": [h.state_dict() for h in self.hooks],
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "sampler": self.sampler.state_dict(),
        }

    def _load(self, path: Path) -> None:
        state = checkpoint.load(path, self.device)
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        if self.augmenter is not None:
            self.augmenter.load_state_dict(state["augmenter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        self.sampler.load_state_dict(state.get("sampler") or {})
        self.epoch, self.best = state["epoch"], state["best"]
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.world_size:
            checkpoint.set_rng_state(ranks[self.rank])
        else:  # another number of processes than the run had: continues correctly, not bit-exactly
            seed_everything(int(np.random.SeedSequence([self.config.seed, self.epoch, self.rank]).generate_state(1)[0]))

    def _save(self, name: str) -> None:
        """Write ``checkpoints/<name>.pt`` (rank 0; every rank takes part in gathering the RNG states)."""
        state = self._state()
        if self.rank == 0:
            checkpoint.save(self.out / "checkpoints" / f"{name}.pt", state)

    def _record(self, record: dict[str, Any], log: str = "metrics.jsonl") -> None:
        if self.rank == 0:
            runfolder.append_record(self.out, record, log=log)

    # ----------------------------------------------------------------- training
    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n, pass_ = 0, 0
        while True:
            self.sampler.set_epoch(epoch, pass_)
            for batch in self.loader:
                yield batch
                n += 1
                if n == self.iters_per_epoch:
                    return
            pass_ += 1

    def _step(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step: model -> [augmenter] -> [miner] -> objective -> optimiser.

        Returns the detached total loss and term values, or a NaN loss (and no step) if the embeddings
        are not finite.
        """
        out = self._forward_backward(x, y, ids, epoch)
        if out is None:
            return torch.tensor(float("nan")), {}
        self._update()
        return out

    @contextmanager
    def _loss_rng(self) -> Iterator[None]:
        """In a distributed run, the random numbers of the loss stage (random miners, augmenters) come from a
        generator seeded by the step, so every rank draws the same on the same global batch."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [],
                                   enabled=self.world_size > 1):
            if self.world_size > 1:
                step = self.scheduler.last_epoch  # optimiser steps so far: checkpointed, so resume is exact
                torch.manual_seed(int(np.random.SeedSequence([self.config.seed, step]).generate_state(1)[0]))
            yield

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, epoch: int
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Forward and backward of one step, without the optimiser: ``(loss, term values)`` detached, or
        None (nothing computed) when the embeddings are not finite. In a distributed run the inputs are this
        rank's batch; the embeddings, labels and data-set indices of all ranks are gathered (this rank's rows
        live), so every term sees the global batch and the gradients equal one process's on it."""
        x = x.to(self.device, non_blocking=True)
        y = distributed.all_gather(self.label_map[y].to(self.device, non_blocking=True))
        ids = distributed.all_gather(ids.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            raw, emb = self.train_model(x, return_raw=True)
        raw, emb = distributed.all_gather_with_grad(raw), distributed.all_gather_with_grad(emb)
        if not bool(torch.isfinite(emb).all()):
            return None
        with self._loss_rng():
            real_emb, real_y = emb, y
            self.sampler.observe(ids, emb)
            synthetic = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
            pairs, classes = self.sampler.pair_rule(emb.shape[0], emb.device), None
            real_pairs = pairs
            if self.augmenter is not None:
                emb, y, synthetic, pairs, classes = self.augmenter(emb, y, raw=raw)
            use_memory = self.memory is not None and epoch >= self.config.memory.start_epoch
            step = StepInputs(
                embeddings=emb, labels=y, raw=raw, inputs=x, sample_ids=ids, is_synthetic=synthetic,
                model=self.model, epoch=epoch, epochs=self.config.train.epochs,
                indices=pair_indices(self.miner, emb, y, pairs), pairs=pairs, classes=classes,
                memory=self.memory.get() if use_memory and len(self.memory) else None,
            )
            if self.augmenter is not None and self.augmenter.aux_loss:  # the losses on the real rows alone too (DAS)
                loss, values = self.objective(step, step.real_rows(self.miner, real_pairs), self.augmenter.aux_weight)
            else:
                loss, values = self.objective(step)
            if use_memory:
                self.memory.enqueue(real_emb, real_y)  # after the loss: a batch is never its own reference
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.average_gradients(self.shared_params)
        return loss.detach(), {k: v.detach() for k, v in values.items()}

    def _update(self) -> None:
        """The optimiser step on the gradients of :meth:`_forward_backward` (clipped, unscaled), and the schedule."""
        if self.config.optimizer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.optimizer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _diverged(self, epoch: int, iteration: int) -> TrainingDivergedError:
        last = self.out / "checkpoints" / "last.pt"
        kept = f"the last good checkpoint is {last} (epoch {self.epoch})" if last.is_file() else "no checkpoint was written yet"
        self._record({"epoch": epoch, "event": "diverged", "iteration": iteration})
        return TrainingDivergedError(
            f"the training loss became NaN/Inf at epoch {epoch}, iteration {iteration} "
            f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); {kept}. Try a lower optimizer.lr, "
            "optimizer.grad_clip, or train.amp=false, then --resume or --overwrite."
        )

    def _train_epoch(self, epoch: int, bar) -> dict[str, float]:
        self.model.train()
        self.objective.train()
        if self.augmenter is not None:
            self.augmenter.train()
        losses, terms, start, seen = [], {}, time.perf_counter(), 0
        for it, (x, y, ids) in enumerate(self._batches(epoch)):
            loss, values = self._step(x, y, ids, epoch)
            value = float(loss)
            if not math.isfinite(value):
                raise self._diverged(epoch, it)
            losses.append(value)
            values = {k: float(v) for k, v in values.items()}
            for k, v in values.items():
                terms.setdefault(k, []).append(v)
            if it % self.config.train.log_every == 0:
                self._record({"epoch": epoch, "iteration": it, "loss": value, **values}, log="steps.jsonl")
            seen += len(y)
            for hook in self.hooks:
                hook.on_batch_end(self, epoch, it, value)
            if bar is not None:
                bar.update(value, self.optimizer.param_groups[0]["lr"], seen / (time.perf_counter() - start))
        elapsed = time.perf_counter() - start
        per_term = {f"loss/{k}": float(np.mean(v)) for k, v in terms.items()} if len(terms) > 1 else {}
        return {"loss": float(np.mean(losses)), **per_term, "lr": self.optimizer.param_groups[0]["lr"],
                "samples_per_s": seen / elapsed, "seconds": elapsed}

    def _select(self, epoch: int, results: dict[str, dict[str, float]]) -> None:
        metric = self.config.train.select_metric
        if self.select_on == "last":
            self.best = {"split": "last", "metric": metric, "epoch": epoch, "value": None}
            return
        value = results[self.select_on][metric]
        if self.best is None or value > self.best["value"]:
            self.best = {"split": self.select_on, "metric": metric, "epoch": epoch, "value": value}
            self._save("best")

    def fit(self) -> dict[str, Any]:
        from deepmetric.training.progress import EpochBar
        cfg = self.config.train
        if self.resume:
            self._load(self.out / "checkpoints" / "last.pt")
            if self.rank == 0:
                runfolder.truncate_records(self.out, self.epoch + 1)
        else:
            if self.rank == 0:
                (self.out / "config.yaml").write_text(dump(self.config))
            results = self.evaluate()
            self._record({"epoch": 0, **{f"{s}/{k}": v for s, m in results.items() for k, v in m.items()}})
        for hook in self.hooks:
            hook.on_train_start(self)
        if self.augmenter is not None:
            self.augmenter.on_train_start(self)
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            for hook in self.hooks:
                hook.on_epoch_start(self, epoch)
            with EpochBar(epoch, cfg.epochs, self.iters_per_epoch, enabled=self.progress) as bar:
                record: dict[str, Any] = {"epoch": epoch, **{f"train/{k}": v for k, v in self._train_epoch(epoch, bar).items()}}
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                results = self.evaluate()
                record.update({f"{s}/{k}": v for s, m in results.items() for k, v in m.items()})
                self.epoch = epoch
                self._select(epoch, results)
            self.epoch = epoch
            self.objective.on_epoch_end(self.model, epoch)
            if self.augmenter is not None:
                self.augmenter.on_epoch_end(self, epoch)
            for hook in self.hooks:
                hook.on_epoch_end(self, epoch, record)
            for module in (self.objective, self.augmenter):  # rank 0's, should an epoch-end step differ by rank
                if module is not None:
                    distributed.broadcast_state(module)
            self._record(record)
            if self.progress:
                EpochBar.print_summary(record, cfg.epochs, cfg.select_metric)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                self._save("last")
        for hook in self.hooks:
            hook.on_train_end(self)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Load the selected checkpoint, evaluate it on the test split, write ``summary.json`` and the report."""
        from deepmetric.training.report import write_report

        distributed.barrier()  # rank 0 has written best.pt
        if self.best and self.best["split"] in ("val", "test"):
            self.model.load_state_dict(checkpoint.load(self.out / "checkpoints" / "best.pt", self.device)["model"])
        results, test_embeddings = self._evaluate()
        initial = next(r for r in runfolder.read_records(self.out) if r["epoch"] == 0)
        untrained = {k.split("/", 1)[1]: v for k, v in initial.items() if k.startswith("test/")}
        summary = {
            "test": results["test"],
            "selected": self.best,
            "baselines": {**self.baselines, "untrained network": untrained},
            "config": self.config.model_dump(mode="json"),
        }
        if "val" in results:
            summary["val"] = results["val"]
        if self.rank != 0:
            return summary
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        test = self.splits.test if self.splits.test is not None else self.splits.gallery
        write_report(self.out, embeddings=test_embeddings, class_names=test.classes, dataset=test)
        return summary

"""Terminal progress: a bar per epoch (loss, learning rate, samples/s) and a one-line epoch summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, soft_wrap=True)


class EpochBar:
    """``with EpochBar(epoch, epochs, total) as bar: bar.update(loss, lr, samples_per_s)``; silent when disabled."""

    def __init__(self, epoch: int, epochs: int, total: int, enabled: bool = True):
        self.enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[sps]:.0f} samples/s"),
            TimeElapsedColumn(), console=console, transient=True, disable=not self.enabled,
        )
        self.task = self.progress.add_task("train", total=total, loss=float("nan"), lr=0.0, sps=0.0)

    def __enter__(self) -> EpochBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, loss: float, lr: float, samples_per_s: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, lr=lr, sps=samples_per_s)

    @staticmethod
    def print_summary(record: dict[str, Any], epochs: int, metric: str) -> None:
        parts = [f"epoch {record['epoch']:>3}/{epochs}", f"loss {record['train/loss']:.4f}",
                 f"{record['train/samples_per_s']:.0f} samples/s"]
        for split in ("val", "test"):
            if f"{split}/{metric}" in record:
                parts.append(f"{split} {metric} {record[f'{split}/{metric}']:.4f}")
        if "test/recall@1" in record:
            parts.append(f"test recall@1 {record['test/recall@1']:.4f}")
        console.print("  ".join(parts))

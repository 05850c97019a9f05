"""The run folder: what a run writes, and the rule that an existing run is never clobbered by accident.

Layout: ``config.yaml`` (resolved), ``metrics.jsonl`` (one JSON record per epoch), ``steps.jsonl`` (every
objective term's value every ``train.log_every`` steps), ``checkpoints/last.pt``
and ``best.pt``, ``summary.json`` (final test metrics and how the checkpoint was selected), ``report/``
(PNG plots and ``report.html``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from deepmetric.errors import RunFolderError

RUN_FILES = ("config.yaml", "metrics.jsonl", "steps.jsonl", "summary.json", "checkpoints", "report")


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def prepare(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse an existing run unless ``resume`` or ``overwrite``; never touch foreign files."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other")
    if resume:
        if not (out / "checkpoints" / "last.pt").is_file():
            raise RunFolderError(f"cannot resume: no checkpoint at {out / 'checkpoints' / 'last.pt'}")
        return
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_run(out):
            raise RunFolderError(f"--out {out} is a non-empty folder that is not a deepmetric run; choose another --out")
        if not overwrite:
            raise RunFolderError(
                f"--out {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def append_record(out: Path, record: dict[str, Any], log: str = "metrics.jsonl") -> None:
    with open(out / log, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(out: Path, log: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = out / log
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_records(out: Path, before_epoch: int) -> None:
    """Drop records of epochs >= ``before_epoch`` from every log (written after the checkpoint a resume
    starts from)."""
    for log in ("metrics.jsonl", "steps.jsonl"):
        if (out / log).is_file():
            kept = [r for r in read_records(out, log) if r.get("epoch", -1) < before_epoch]
            (out / log).write_text("".join(json.dumps(r) + "\n" for r in kept))

"""``deepmetric tune``: coordinate-descent search (:func:`deepmetric.tuning.coordinate_descent`) over config keys,
each point evaluated by a short training run on the validation classes, recorded in a table.

Every evaluated point is a run folder ``out/<key=value,...>/`` (finished runs are reused when the search is
run again, interrupted ones resumed: the same machinery as ``deepmetric benchmark``); ``out/tune.csv`` and
``out/tune.md`` list every evaluation in order, with the validation score that drove the search and the
test metrics for information, and mark the best point.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deepmetric.errors import ConfigError
from deepmetric.training.config import check_components, load, lookup, parse_override
from deepmetric.training.grid import Run, _slug, _write_csv, metric_label, run_state, train_run
from deepmetric.tuning import SearchResult, coordinate_descent


def parse_param(item: str) -> tuple[str, list[Any]]:
    """``"loss.neg_weight=0.25,0.5,1"`` -> ``("loss.neg_weight", [0.25, 0.5, 1])`` (values parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--param expects key=v1,v2,... (e.g. loss.neg_weight=0.25,0.5,1,2), got {item!r}")
    key, values = item.split("=", 1)
    parsed = [parse_override(f"{key}={v.strip()}")[1] for v in values.split(",") if v.strip()]
    if len(parsed) < 2:
        raise ConfigError(f"--param {key.strip()} needs at least two values to search, got {values!r}")
    return key.strip(), parsed


@dataclass
class TuneResult:
    search: SearchResult
    rows: list[dict[str, Any]]


def tune(
    config: str | Path | None,
    params: dict[str, Sequence[Any]],
    overrides: Sequence[str] = (),
    out: str | Path = "runs/tune",
    metric: str = "map@r",
    max_cycles: int = 3,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> TuneResult:
    """Search ``params`` (config key -> ordered candidate values) for the best validation ``metric``.

    Each point trains ``config`` + ``overrides`` + the point's ``key=value`` items; the score is the selected
    checkpoint's ``metric`` on the validation classes (``data.val_classes`` or ``data.val_folds`` must be set:
    tuning on the test classes would leak them). The search starts at the config's own value of each key
    when it is in the grid, else in the middle of the grid.
    """
    out = Path(out)
    base = load(config, list(overrides))
    check_components(base)
    if not (base.data.val_classes or base.data.val_folds):
        raise ConfigError("deepmetric tune scores each point on held-out training classes: set data.val_classes "
                          "(e.g. --set data.val_classes=2) or data.val_folds; the test classes are never used to tune")
    raw = base.model_dump(mode="json")
    start = {k: next((c for c in params[k] if c == lookup(raw, k)), None) for k in params}  # 1 == 1.0
    start = {k: v for k, v in start.items() if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.yaml").write_text(yaml.safe_dump(
        {"config": str(config) if config else None, "set": list(overrides), "params": {k: list(v) for k, v in params.items()},
         "metric": metric, "max_cycles": max_cycles}, sort_keys=False))
    rows: list[dict[str, Any]] = []

    def evaluate(point: dict[str, Any]) -> float:
        sets = [f"{k}={json.dumps(v)}" for k, v in point.items()]  # JSON is YAML: parses back unchanged
        cfg = load(config, [*overrides, *sets])
        check_components(cfg)
        name = _slug(",".join(sets))
        run = Run("tune", name, cfg.seed, None, cfg, out / name)
        state = run_state(run)
        echo(f"[{len(rows) + 1}] {', '.join(sets)}: {dict(done='finished, reused', resume='resuming', new='training')[state]}")
        summary = train_run(run, state, progress=progress)
        if metric not in summary["val"]:
            raise ConfigError(f"metric {metric!r} is not computed; available: {', '.join(sorted(summary['val']))}")
        score = float(summary["val"][metric])
        rows.append({"order": len(rows) + 1, **point, f"val {metric_label(metric)}": score,
                     **{f"test {metric_label(k)}": summary["test"][k] for k in ("recall@1", "map@r") if k in summary["test"]},
                     "folder": name})
        echo(f"    val {metric_label(metric)} = {score:.4f}")
        write_table(out, rows, params, metric)
        return score

    search = coordinate_descent(evaluate, params, start=start, max_cycles=max_cycles)
    write_table(out, rows, params, metric, search.best)
    return TuneResult(search, rows)


def write_table(out: Path, rows: list[dict[str, Any]], params: dict[str, Sequence[Any]], metric: str,
                best: dict[str, Any] | None = None) -> None:
    """``tune.csv`` and ``tune.md``: one row per evaluation, the best point marked (once the search ended)."""
    marked = [{**r, "best": "yes" if best is not None and all(r[k] == best[k] for k in params) else ""} for r in rows]
    _write_csv(out / "tune.csv", marked)
    cols = [c for c in marked[0] if c != "folder"] if marked else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in marked:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    note = (f"\n- Coordinate descent (Sors et al. 2021) on the validation {metric_label(metric)} (classes held out of "
            "training); the test metrics are for information and were not used to choose.\n")
    (out / "tune.md").write_text("\n".join(lines) + "\n" + note)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)

"""``deepmetric benchmark``: a grid of training runs (configs x variants x seeds [x folds]), resumable, and
one results table of mean ± std per (config, variant) in CSV and Markdown.

A **grid** names config files, **variants** (named lists of ``--set`` overrides, e.g. a method alone and with
a regulariser), seeds and a protocol. Every run gets its own run folder under ``out``::

    out/<config>/<variant>/seed<k>/            (standard)
    out/<config>/<variant>/seed<k>/fold<f>/    (reality-check; plus seed<k>/ensemble.json)

and the grid writes ``out/grid.yaml`` (the resolved grid), ``out/runs.csv`` (one row per run) and
``out/results.csv`` / ``out/results.md`` (mean, sample std and 95% t-interval over seeds), refreshed after
every run. With a ``baseline`` (``untrained``: each run's own network before training, i.e. its epoch-0
test evaluation; or a variant: its run with the same config and seed) the tables add **paired**
differences, variant minus baseline seed by seed (mean ± std), and how many seeds reach the baseline.
Running the same grid again skips finished runs (``summary.json`` present), resumes interrupted ones from
``checkpoints/last.pt``, and refuses a folder holding a run of a different configuration.

Protocols:

* ``standard``: each run trains as its config says and reports the checkpoint its config selects
  (``data.val_classes`` -> held-out training classes; otherwise the last epoch; ``select_on: test`` is
  flagged). The table states which split selected the checkpoints.
* ``reality-check`` (Musgrave, Belongie & Lim 2020, "A Metric Learning Reality Check"): the sorted training
  classes are cut into ``folds`` (4) class-disjoint folds; model f trains on the other folds and its
  checkpoint is the best validation MAP@R on fold f. Embeddings are 128-d per model. Test metrics are
  reported two ways: **separated**, the mean of the fold models' metrics, and **concatenated**, the metrics
  of the L2-normalised fold embeddings joined into one (4 x 128 = 512-d) embedding. ``train.select_metric``
  defaults to ``map@r`` and ``model.embedding_size`` to 128; both can be changed with ``--set``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from deepmetric.errors import ConfigError, RunFolderError, UnknownNameError
from deepmetric.training.config import RunConfig, check_components, load, parse_override

PROTOCOLS = ("standard", "reality-check")
UNTRAINED = "untrained"  # the baseline that is each run's own network before training
#: protocol defaults, applied after the config file and before the grid's own overrides
PROTOCOL_DEFAULTS = {"standard": [], "reality-check": ["model.embedding_size=128", "train.select_metric=map@r"]}
METRIC_NAMES = {"map@r": "MAP@R", "r_precision": "R-Precision", "nmi": "NMI", "ami": "AMI", "f1": "F1", "map": "mAP"}


def metric_label(key: str) -> str:
    """``recall@1`` -> ``R@1``, ``map@r`` -> ``MAP@R``, ..."""
    if key.startswith("recall@"):
        return "R@" + key.split("@", 1)[1]
    if key.startswith("precision@"):
        return "P@" + key.split("@", 1)[1]
    return METRIC_NAMES.get(key, key)


# ------------------------------------------------------------------------------------------- the grid

class GridFile(BaseModel):
    """The YAML grid file."""

    model_config = ConfigDict(extra="forbid")
    configs: list[str] | dict[str, str | None] = Field(
        default_factory=list, description="config files (relative to the grid file, else to the working folder), "
        "or {name: file}; none = the built-in defaults")
    variants: dict[str, list[str] | dict[str, Any]] = Field(
        default_factory=dict, description="name -> overrides, as ['key=value', ...] or {key: value}")
    seeds: list[int] = Field(default_factory=lambda: [0])
    set: list[str] = Field(default_factory=list, description="overrides applied to every run")
    protocol: Literal["standard", "reality-check"] = "standard"
    folds: int = Field(4, ge=2, description="reality-check: class-disjoint folds of the training classes")
    baseline: str | dict[str, str] | None = Field(
        None, description="paired differences: 'untrained' (each run's epoch-0 evaluation), a variant name (the "
        "run of that variant with the same config and seed), or {variant: baseline} for some variants")


@dataclass
class Grid:
    """What to run: every config x variant x seed (x fold for the reality check)."""

    configs: dict[str, Path | None]
    variants: dict[str, list[str]]
    seeds: list[int]
    overrides: list[str] = field(default_factory=list)
    protocol: str = "standard"
    folds: int = 4
    baselines: dict[str, str] = field(default_factory=dict)  # variant -> its baseline variant, or UNTRAINED

    def to_dict(self) -> dict[str, Any]:
        return {"configs": {k: (str(v) if v else None) for k, v in self.configs.items()}, "variants": self.variants,
                "seeds": self.seeds, "set": self.overrides, "protocol": self.protocol, "folds": self.folds,
                "baseline": self.baselines or None}


@dataclass
class Run:
    config: str
    variant: str
    seed: int
    fold: int | None
    cfg: RunConfig
    folder: Path

    @property
    def label(self) -> str:
        fold = f" fold {self.fold}" if self.fold is not None else ""
        return f"{self.config} | {self.variant} | seed {self.seed}{fold}"


def sweep(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split ``--set`` items into overrides common to every run and swept variants.

    A key given once applies to every run; a key given several times with different values is swept, and
    the variants are the product of all swept keys, named by their overrides (``loss.name=contrastive``).
    """
    by_key: dict[str, list[str]] = {}
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if item not in by_key.setdefault(key, []):
            by_key[key].append(item)
    common = [items[0] for items in by_key.values() if len(items) == 1]
    axes = [items for items in by_key.values() if len(items) > 1]
    variants = {" ".join(combo): list(combo) for combo in itertools.product(*axes)} if axes else {}
    return common, variants


def _variant_overrides(spec: list[str] | dict[str, Any]) -> list[str]:
    if isinstance(spec, dict):  # {key: value}: JSON is YAML, so the value parses back unchanged
        return [f"{k}={json.dumps(v)}" for k, v in spec.items()]
    return list(spec)


def _baselines(spec: str | dict[str, str] | None, file_variants: Sequence[str], swept: Sequence[str],
               protocol: str) -> dict[str, str]:
    """Each variant's baseline (a variant name or ``untrained``) from the grid's ``baseline``, whose names are
    the grid file's variants (or the swept ones when the file has none); a file variant crossed with a sweep
    is compared with its baseline crossed with the same sweep."""
    if spec is None:
        return {}
    named = list(file_variants) or list(swept) or ["default"]
    per = {v: spec for v in named if v != spec} if isinstance(spec, str) else dict(spec)
    for variant, base in per.items():
        if variant not in named:
            raise ConfigError(f"baseline: {variant!r} is not a variant; variants: {', '.join(named)}")
        if base == variant or (base != UNTRAINED and base not in named):
            others = ", ".join(n for n in named if n != variant) or "there is none"
            raise ConfigError(f"baseline of {variant!r} must be {UNTRAINED!r} or another variant ({others}), "
                              f"got {base!r}")
    if UNTRAINED in per.values() and protocol != "standard":
        raise ConfigError(f"baseline {UNTRAINED!r} needs the standard protocol; compare with a variant instead")
    if file_variants and swept:
        return {f"{a} {b}": (base if base == UNTRAINED else f"{base} {b}") for a, base in per.items() for b in swept}
    return per


def _config_names(paths: Sequence[Path]) -> dict[str, Path]:
    """Name configs by the shortest trailing path that tells them apart: ``multi_similarity`` or
    ``cub200/multi_similarity`` when several folders hold a ``multi_similarity.yaml``."""
    parts = [p.with_suffix("").parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return dict(zip(names, paths))
    raise ConfigError(f"the same config file is listed twice: {[str(p) for p in paths]}")


def _resolve(path: str, base: Path | None) -> Path:
    candidates = ([base / path] if base is not None else []) + [Path(path)]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file not found: {path} (looked in {', '.join(str(c) for c in candidates)})")


def read_grid_file(path: str | Path) -> GridFile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return GridFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except ValidationError as err:
        lines = [f"'{'.'.join(str(p) for p in e['loc'])}': {e['msg']}" for e in err.errors()]
        valid = ", ".join(GridFile.model_fields)
        raise ConfigError(f"invalid grid file {path}:\n  " + "\n  ".join(lines) + f"\nValid keys: {valid}") from None


def make_grid(
    grid_file: str | Path | None = None,
    configs: Sequence[str | Path] | None = None,
    overrides: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    protocol: str | None = None,
    folds: int | None = None,
    baseline: str | None = None,
) -> Grid:
    """Combine a grid file with command-line options: ``configs``, ``seeds``, ``protocol``, ``folds`` and
    ``baseline`` replace the file's; ``overrides`` (``--set``) come after the file's ``set``, and keys given
    several times are swept (:func:`sweep`), multiplying the file's variants."""
    spec = read_grid_file(grid_file) if grid_file is not None else GridFile()
    base = Path(grid_file).parent if grid_file is not None else None
    if configs:
        named = _config_names([_resolve(str(c), None) for c in configs])
    elif isinstance(spec.configs, dict):
        named = {k: (_resolve(v, base) if v else None) for k, v in spec.configs.items()}
    elif spec.configs:
        named = _config_names([_resolve(c, base) for c in spec.configs])
    else:
        named = {"defaults": None}
    common, swept = sweep(list(overrides or []))
    file_variants = {k: _variant_overrides(v) for k, v in spec.variants.items()}
    if file_variants and swept:
        variants = {f"{a} {b}": file_variants[a] + swept[b] for a in file_variants for b in swept}
    else:
        variants = file_variants or swept or {"default": []}
    protocol = protocol or spec.protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    seeds = list(seeds) if seeds else spec.seeds
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct integers, got {seeds}")
    folds = folds or spec.folds
    if folds < 2:
        raise ConfigError(f"the reality check needs at least 2 folds, got {folds}")
    baselines = _baselines(baseline or spec.baseline, list(file_variants), list(swept), protocol)
    return Grid(named, variants, seeds, [*spec.set, *common], protocol, folds, baselines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", name).strip("_") or "_"


def plan(grid: Grid, out: str | Path) -> list[Run]:
    """Every run of the grid with its validated config and run folder (folds of a trial are consecutive)."""
    out = Path(out)
    for kind, names in (("config", grid.configs), ("variant", grid.variants)):
        slugs = [_slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"{kind} names {list(names)} give the same folder name; rename them")
    runs = []
    for (cname, path), (vname, variant), seed in itertools.product(
        grid.configs.items(), grid.variants.items(), grid.seeds
    ):
        folder = out.joinpath(*(_slug(p) for p in cname.split("/")), _slug(vname), f"seed{seed}")
        sets = [*PROTOCOL_DEFAULTS[grid.protocol], *grid.overrides, *variant, f"seed={seed}"]
        folds = [None] if grid.protocol == "standard" else list(range(grid.folds))
        for f in folds:
            fold_sets = [] if f is None else [f"data.val_folds={grid.folds}", f"data.val_fold={f}",
                                              "data.val_classes=0", "train.select_on=val"]
            try:
                cfg = load(path, sets + fold_sets)
                check_components(cfg)
            except (ConfigError, UnknownNameError) as exc:
                raise type(exc)(f"{cname} | {vname}: {exc}") from None
            runs.append(Run(cname, vname, seed, f, cfg, folder if f is None else folder / f"fold{f}"))
    return runs


# ------------------------------------------------------------------------------------------- running

def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_state(run: Run) -> str:
    """``done`` (finished), ``resume`` (has a checkpoint), ``new``; an error if the folder holds another config."""
    stored = run.folder / "config.yaml"
    if stored.is_file():  # compared after validation, so keys a newer version added compare as their defaults
        try:
            old = _flat(load(stored).model_dump(mode="json"))
        except ConfigError as exc:
            raise RunFolderError(f"{run.folder} holds a run whose config.yaml no longer loads ({exc}); "
                                 "pass --overwrite to rerun the grid or choose another --out") from None
        new = _flat(run.cfg.model_dump(mode="json"))
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if differ:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
            raise RunFolderError(
                f"{run.folder} holds a run of a different configuration ({shown}"
                f"{', ...' if len(differ) > 5 else ''}); pass --overwrite to rerun the grid or choose another --out"
            )
    if (run.folder / "summary.json").is_file():
        return "done"
    if (run.folder / "checkpoints" / "last.pt").is_file():
        return "resume"
    return "new"


def train_run(run: Run, state: str, progress: bool = False) -> dict[str, Any]:
    """Train (``new``), resume (``resume``) or just read (``done``) one run; returns its ``summary.json`` content."""
    from deepmetric.training.trainer import Trainer

    if state == "done":
        return json.loads((run.folder / "summary.json").read_text())
    stale = run.folder.is_dir() and any(run.folder.iterdir())  # e.g. stopped before its first checkpoint
    trainer = Trainer(run.cfg, run.folder, resume=state == "resume", overwrite=state == "new" and stale,
                      progress=progress)
    return trainer.fit()


class ConcatEmbedding(nn.Module):
    """The Reality Check's ensemble: the L2-normalised embeddings of several models, concatenated."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(m(x).float(), dim=-1) for m in self.members], dim=1)


def ensemble_metrics(fold_runs: Sequence[Run], path: Path, reuse: bool = True) -> dict[str, Any]:
    """Test metrics of the concatenated fold models (each at its selected checkpoint), written to ``path``
    with the classes each fold held out (and read back from it when ``reuse`` and it is for these runs)."""
    from deepmetric.data.base import class_folds
    from deepmetric.training.build import build_splits, resolve_amp
    from deepmetric.training.evaluate_run import evaluate_model, load_run_model

    folders = [str(r.folder) for r in fold_runs]
    if reuse and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("runs") == folders:
            return cached
    loaded = [load_run_model(r.folder, "best") for r in fold_runs]
    cfg, device = loaded[0][0], loaded[0][2]
    model = ConcatEmbedding([m for _, m, _ in loaded]).to(device)
    splits = build_splits(cfg)
    metrics, (embeddings, _) = evaluate_model(model, splits, cfg.eval, device, resolve_amp(cfg.train.amp, device))
    classes = np.concatenate([splits.train.labels, splits.val.labels])
    names = splits.train.classes
    folds = []
    for r in fold_runs:
        held = class_folds(classes, r.cfg.data.val_folds, r.cfg.data.val_fold)[1].tolist()
        folds.append({"fold": r.fold, "val_classes": held,
                      **({"val_class_names": [names[c] for c in held]} if names is not None else {})})
    result = {"test": metrics, "embedding_size": int(embeddings.shape[1]), "folds": folds, "runs": folders}
    path.write_text(json.dumps(result, indent=2))
    return result


def _record(run: Run, view: str, metrics: dict[str, float], selected: dict[str, Any] | None, out: Path) -> dict:
    return {"config": run.config, "variant": run.variant, "view": view, "seed": run.seed,
            "fold": "" if run.fold is None else run.fold,
            "selected_on": selected["split"] if selected else "", "selected_epoch": selected["epoch"] if selected else "",
            "folder": str(run.folder.relative_to(out)) if run.folder.is_relative_to(out) else str(run.folder),
            **metrics}


def run_grid(
    grid: Grid,
    out: str | Path,
    overwrite: bool = False,
    progress: bool = False,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume) every run of ``grid`` under ``out``; write the tables after each; return the result rows."""
    out = Path(out)
    runs = plan(grid, out)  # validates every config before anything trains
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(grid.to_dict(), sort_keys=False))
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    trial: list[tuple[Run, dict[str, Any], str]] = []
    for i, run in enumerate(runs, 1):
        state = "new" if overwrite else run_state(run)
        echo(f"[{i}/{len(runs)}] {run.label}: {dict(done='finished, skipped', resume='resuming', new='training')[state]}")
        summary = train_run(run, state, progress=progress)
        metrics = dict(summary["test"])
        if grid.baselines.get(run.variant) == UNTRAINED:
            metrics.update({f"{UNTRAINED}/{k}": v for k, v in untrained_metrics(run.folder).items()})
        view = "single" if run.fold is None else "fold"
        records.append(_record(run, view, metrics, summary.get("selected"), out))
        if run.fold is not None:
            trial.append((run, summary, state))
            if run.fold == grid.folds - 1:
                records += _trial_records(trial, out)
                trial = []
        rows = write_tables(out, records, grid.protocol, grid.baselines)
    return rows


def untrained_metrics(folder: Path) -> dict[str, float]:
    """The test metrics of a run's network before training: its epoch-0 evaluation in ``metrics.jsonl``."""
    from deepmetric.training.runfolder import read_records

    for record in read_records(folder):
        if record.get("epoch") == 0 and "event" not in record:
            return {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("test/")}
    raise RunFolderError(f"{folder} has no epoch-0 evaluation in metrics.jsonl, so no untrained baseline")


def _trial_records(trial: list[tuple[Run, dict[str, Any], str]], out: Path) -> list[dict[str, Any]]:
    fold_runs, summaries = [r for r, _, _ in trial], [s for _, s, _ in trial]
    keys = [k for k in summaries[0]["test"] if all(k in s["test"] for s in summaries)]
    separated = {k: float(np.mean([s["test"][k] for s in summaries])) for k in keys}
    ensemble = ensemble_metrics(fold_runs, fold_runs[0].folder.parent / "ensemble.json",
                                reuse=all(state == "done" for _, _, state in trial))
    trial_run = Run(fold_runs[0].config, fold_runs[0].variant, fold_runs[0].seed, None, fold_runs[0].cfg,
                fold_runs[0].folder.parent)
    val = {"split": "val", "epoch": ""}
    return [_record(trial_run, "separated", separated, val, out),
            _record(trial_run, "concatenated", ensemble["test"], val, out)]


# ------------------------------------------------------------------------------------------- tables

def _metric_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    from deepmetric.training.report import LEAD_METRICS

    fixed = {"config", "variant", "view", "seed", "fold", "selected_on", "selected_epoch", "folder"}
    keys = {k for r in records for k, v in r.items() if k not in fixed and isinstance(v, (int, float))
            and not k.startswith("n_")}
    return [k for k in LEAD_METRICS if k in keys] + sorted(keys - set(LEAD_METRICS))


def _summarise(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and 95% t-interval half-width (NaN where undefined)."""
    from scipy import stats

    a, n = np.asarray(values, dtype=float), len(values)
    std = float(a.std(ddof=1)) if n > 1 else math.nan
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return (float(a.mean()) if n else math.nan), std, ci


def aggregate(records: Sequence[dict[str, Any]], baselines: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per (config, variant, view) of the single runs (standard) or trials (separated / concatenated):
    ``n``, and per metric the mean, the sample standard deviation and the 95% t-interval half-width.

    A variant with a baseline (``baselines[variant]``: a variant, or ``untrained``) also gets, per metric, the
    paired differences ``d_s = metric(variant, seed s) − metric(baseline, seed s)`` over the seeds whose
    baseline is known: ``<k>_delta_mean`` / ``_std`` / ``_ci95`` and ``<k>_ge_baseline`` (seeds with d_s ≥ 0)."""
    baselines = baselines or {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["view"] != "fold":
            groups.setdefault((r["config"], r["variant"], r["view"]), []).append(r)
    by_seed = {(c, v, w, r["seed"]): r for (c, v, w), rs in groups.items() for r in rs}
    keys = _metric_keys(records)
    rows = []
    for (config, variant, view), rs in groups.items():
        row: dict[str, Any] = {"config": config, "variant": variant, "view": view,
                               "selected_on": ",".join(sorted({str(r["selected_on"]) for r in rs})), "n": len(rs)}
        for k in keys:
            row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_ci95"] = _summarise([r[k] for r in rs if k in r])
        base = baselines.get(variant)
        if base is not None:
            row["baseline"] = base
            for k in (k for k in keys if not k.startswith(f"{UNTRAINED}/")):
                if base == UNTRAINED:
                    pairs = [(r[k], r[f"{UNTRAINED}/{k}"]) for r in rs if k in r and f"{UNTRAINED}/{k}" in r]
                else:
                    refs = [(r, by_seed.get((config, base, view, r["seed"]))) for r in rs]
                    pairs = [(r[k], b[k]) for r, b in refs if b is not None and k in r and k in b]
                d = [a - b for a, b in pairs]
                row[f"{k}_delta_mean"], row[f"{k}_delta_std"], row[f"{k}_delta_ci95"] = _summarise(d)
                row[f"{k}_ge_baseline"], row[f"{k}_n_paired"] = sum(x >= 0 for x in d), len(d)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    return "" if isinstance(value, float) and math.isnan(value) else str(value)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: _cell(r.get(k, "")) for k in columns} for r in rows)


SELECTION_NOTES = {
    "val": "**val**: each checkpoint was chosen on classes held out from its training classes "
           "(data.val_classes, or the held-out fold); the test classes were never used to choose it.",
    "last": "**last**: no selection; the last epoch of a fixed schedule.",
    "test": "**test**: WARNING, chosen on the test classes, so those figures are optimistic (Musgrave et al. 2020).",
}


def _mean_std(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return ""
    text = f"{round(mean, 4) + 0.0:+.4f}".replace("-", "\u2212") if signed else f"{mean:.4f}"  # never "-0.0000"
    return text + ("" if math.isnan(std) else f" ± {std:.4f}")


#: metrics whose paired differences the Markdown table shows (all of them are in results.csv)
PAIRED_COLUMNS = ("map@r", "recall@1")


def markdown_table(rows: Sequence[dict[str, Any]], protocol: str) -> str:
    """The Markdown results table: mean ± std per lead metric (MAP@R first), which split selected the
    checkpoints, and MAP@R's 95% confidence interval; with baselines, the paired differences of MAP@R and
    R@1 and the seeds at or above the baseline."""
    from deepmetric.training.report import LEAD_METRICS

    keys = [k for k in LEAD_METRICS if rows and f"{k}_mean" in rows[0]]
    paired = [k for k in PAIRED_COLUMNS if any(f"{k}_delta_mean" in r for r in rows)]
    rc = protocol == "reality-check"
    head = ["config", "variant", *(["view"] if rc else []), "selected on", "n", *map(metric_label, keys)]
    if "map@r" in keys:
        head.append("MAP@R 95% CI")
    if paired:
        head += ["baseline", *(f"Δ {metric_label(k)} (paired)" for k in paired),
                 f"seeds ≥ baseline ({', '.join(map(metric_label, paired))})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["config"], r["variant"], *([r["view"]] if rc else []), r["selected_on"], str(r["n"])]
        for k in keys:
            cells.append(_mean_std(r[f"{k}_mean"], r[f"{k}_std"]))
        if "map@r" in keys:
            lo, hw = r["map@r_mean"], r["map@r_ci95"]
            cells.append("n/a" if math.isnan(hw) else f"[{lo - hw:.4f}, {lo + hw:.4f}]")
        if paired:
            has = "baseline" in r
            cells.append(r.get("baseline", ""))
            cells += [_mean_std(r[f"{k}_delta_mean"], r[f"{k}_delta_std"], signed=True) if has else "" for k in paired]
            cells.append(", ".join(f"{r[f'{k}_ge_baseline']}/{r[f'{k}_n_paired']}" for k in paired) if has else "")
        lines.append("| " + " | ".join(cells) + " |")
    n_what = "trials (seeds)" if rc else "runs (seeds)"
    notes = [f"Protocol: **{protocol}**. Cells: mean ± sample standard deviation over the n {n_what}; "
             "95% confidence intervals (t-distribution) of every metric are in results.csv."]
    if rc:
        notes.append("Reality Check (Musgrave et al. 2020): class-disjoint cross-validation on the training classes; "
                     "**separated** = mean of the fold models' test metrics, **concatenated** = the L2-normalised "
                     "fold embeddings joined into one embedding.")
    splits = {s for r in rows for s in str(r["selected_on"]).split(",") if s}
    notes += [SELECTION_NOTES[s] for s in ("val", "last", "test") if s in splits]
    if paired:
        notes.append("**Δ (paired)**: mean ± std over the seeds of (variant − baseline) with the same seed (and "
                     "config); **seeds ≥ baseline**: seeds whose value is at least the baseline's.")
    untrained = [r for r in rows if r.get("baseline") == UNTRAINED]
    if untrained:
        notes.append(f"**{UNTRAINED}**: each run's own network before training (its epoch-0 test evaluation); "
                     f"mean ± std over the seeds: {untrained_text(untrained, paired)}.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def untrained_text(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """The untrained networks' mean ± std of ``keys``: the value most rows share (variants with the same
    network and seeds), then the variants whose networks score otherwise (e.g. another architecture)."""
    def text(r: dict[str, Any]) -> str:
        return ", ".join(f"{metric_label(k)} {_mean_std(r[f'{UNTRAINED}/{k}_mean'], r[f'{UNTRAINED}/{k}_std'])}"
                         for k in keys if f"{UNTRAINED}/{k}_mean" in r)

    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(text(r), []).append(r["variant"])
    (common, _), *others = sorted(groups.items(), key=lambda item: -len(item[1]))
    return common + "".join(f"; {', '.join(variants)}: {value}" for value, variants in others)


def write_tables(out: Path, records: Sequence[dict[str, Any]], protocol: str,
                 baselines: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Write ``runs.csv``, ``results.csv`` and ``results.md`` under ``out``; return the aggregated rows."""
    rows = aggregate(records, baselines)
    _write_csv(out / "runs.csv", records)
    _write_csv(out / "results.csv", [{"protocol": protocol, **r} for r in rows])
    (out / "results.md").write_text(markdown_table(rows, protocol))
    return rows

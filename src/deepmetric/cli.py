"""The ``deepmetric`` command line: train, evaluate, benchmark, tune, demo, transfer, ood, embed, index, search,
calibrate, match, export, serve, list, config."""

from __future__ import annotations

import functools
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from deepmetric.errors import DeepMetricError

app = typer.Typer(help="Deep metric learning: train, evaluate and inspect embedding models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
out_console = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (default: the built-in digits config).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key, e.g. --set train.epochs=5 (repeatable).")]


def friendly(fn):
    """Turn deepmetric's own errors into a one-paragraph message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeepMetricError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None

    return wrapper


def metrics_table(rows: dict[str, dict[str, float]], title: str) -> Table:
    """A table with one row per embedding and the lead metrics as columns (MAP@R first)."""
    from deepmetric.training.report import LEAD_METRICS

    cols = [k for k in LEAD_METRICS if any(k in r for r in rows.values())]
    table = Table(title=title)
    table.add_column("embedding")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.4f}" if c in m else "" for c in cols))
    return table


@app.command()
@friendly
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<data>-<loss>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars and per-epoch lines.")] = True,
) -> None:
    """Train an embedding model; writes config, metrics.jsonl, checkpoints and a report to the run folder."""
    from deepmetric import distributed
    from deepmetric.training import Trainer, config as cfgmod
    from deepmetric.training.report import selection_text

    if resume:
        if out is None or config is not None:
            raise typer.BadParameter("--resume needs --out RUN_DIR and uses that run's config.yaml "
                                     "(change e.g. the epochs with --set train.epochs=N), not --config")
        cfg = cfgmod.load(out / "config.yaml", set_)
    else:
        cfg = cfgmod.load(config, set_)
    if out is None:
        if distributed.launched_by_torchrun():
            raise typer.BadParameter("under torchrun all processes write one run folder: give --out RUN_DIR")
        out = Path("runs") / f"{cfg.data.name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
        summary = trainer.fit()
    except KeyboardInterrupt:
        err_console.print(f"interrupted. Continue from the last checkpoint with: deepmetric train --out {out} --resume")
        raise typer.Exit(130) from None
    finally:
        distributed.shutdown()
    if trainer.rank:  # rank 0 of a torchrun launch prints
        return
    out_console.print(metrics_table({**summary["baselines"], "trained": summary["test"]}, f"test metrics ({cfg.data.name})"))
    out_console.print(selection_text(summary["selected"]))
    out_console.print(f"run folder: {out}\nreport: {out / 'report' / 'report.html'}")


@app.command()
@friendly
def evaluate(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run folder written by `deepmetric train`.")] = None,
    checkpoint: Annotated[str, typer.Option(help="Which checkpoint of the run: best or last.")] = "best",
    embeddings: Annotated[Optional[Path], typer.Option(help="Embeddings file (.npy, .npz or .pt) instead of a run.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Labels file for --embeddings.")] = None,
    query_embeddings: Annotated[Optional[Path], typer.Option(help="Separate query embeddings (else leave-one-out).")] = None,
    query_labels: Annotated[Optional[Path], typer.Option(help="Labels of --query-embeddings.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Where to write the metrics as JSON.")] = None,
) -> None:
    """Evaluate a run's checkpoint on its test split, or embeddings stored in files."""
    from deepmetric import evaluation

    if (run_dir is None) == (embeddings is None):
        raise typer.BadParameter("give either RUN_DIR or --embeddings (with --labels)")
    if embeddings is not None:
        if labels is None:
            raise typer.BadParameter("--embeddings needs --labels")
        results = evaluation.evaluate_files(embeddings, labels, query_embeddings, query_labels)
        json_out = json_out or embeddings.with_suffix(".metrics.json")
        title = str(embeddings)
    else:
        from deepmetric.training.evaluate_run import evaluate_run

        results = evaluate_run(run_dir, checkpoint)
        json_out = json_out or run_dir / f"eval_{checkpoint}.json"
        title = f"{run_dir} ({checkpoint} checkpoint)"
    out_console.print(metrics_table({"embedding": results}, title))
    evaluation.write_json(results, json_out)
    out_console.print(f"wrote {json_out}")


class Protocol(str, Enum):
    standard = "standard"
    reality_check = "reality-check"


@app.command()
@friendly
def benchmark(
    grid: Annotated[Optional[Path], typer.Argument(help="Grid YAML: configs, variants (named override lists), "
                                                         "seeds, set, protocol, folds.")] = None,
    config: Annotated[Optional[list[Path]], typer.Option("--config", "-c", help="Config file (repeatable; replaces "
                                                         "the grid's configs; default: the built-in digits config).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override for every run, e.g. --set "
                    "train.epochs=5; a key given several times is swept: --set loss.name=a --set loss.name=b.")] = None,
    seeds: Annotated[Optional[list[str]], typer.Option(help="Seeds, e.g. --seeds 0,1,2 (default: the grid's, else 0).")] = None,
    protocol: Annotated[Optional[Protocol], typer.Option(help="standard, or reality-check (Musgrave et al. 2020: "
                                                          "class-disjoint folds, separated and concatenated).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="reality-check: folds of the training classes (default 4).")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="Paired differences in the table against 'untrained' "
                        "(each run's network before training) or a variant (same config and seed).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the run folders and the tables.")] = Path("runs/benchmark"),
    overwrite: Annotated[bool, typer.Option(help="Rerun every run from scratch.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs and their state; train nothing.")] = False,
    progress: Annotated[bool, typer.Option(help="Show each run's progress bars.")] = True,
) -> None:
    """Run a grid of configs x variants x seeds (resuming what finished) and write a table of mean ± std."""
    from deepmetric.errors import ConfigError, RunFolderError
    from deepmetric.training import grid as gridmod

    try:
        seed_list = [int(s) for item in seeds or [] for s in item.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects integers, e.g. --seeds 0,1,2; got {seeds}") from None
    g = gridmod.make_grid(grid, config, set_, seed_list, protocol.value if protocol else None, folds, baseline)
    if dry_run:
        for run in gridmod.plan(g, out):
            try:
                state = gridmod.run_state(run)
            except RunFolderError:
                state = "differs"  # the folder holds another configuration: run_grid would stop there
            out_console.print(f"{state:>7}  {run.label}  ->  {run.folder}", highlight=False, markup=False)
        return
    try:
        gridmod.run_grid(g, out, overwrite=overwrite, progress=progress,
                         echo=lambda line: out_console.print(line, highlight=False, markup=False))
    except KeyboardInterrupt:
        err_console.print("interrupted. Run the same command again to resume: finished runs are skipped.")
        raise typer.Exit(130) from None
    out_console.print((out / "results.md").read_text(), highlight=False, markup=False)
    out_console.print(f"tables: {out / 'results.md'}, {out / 'results.csv'} (per run: {out / 'runs.csv'})")


@app.command()
@friendly
def tune(
    param: Annotated[list[str], typer.Option("--param", "-p", help="A key to search and its ordered candidates, e.g. "
                     "--param loss.neg_weight=0.25,0.5,1,2,4 (repeatable: one coordinate each).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    metric: Annotated[str, typer.Option(help="Validation metric to maximise.")] = "map@r",
    max_cycles: Annotated[int, typer.Option(help="Most cycles over the coordinates.")] = 3,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the run folders and tune.csv / tune.md.")] = Path("runs/tune"),
    progress: Annotated[bool, typer.Option(help="Show each run's progress bars.")] = False,
) -> None:
    """Coordinate-descent search of config keys (e.g. a contrastive loss's balance) by short training runs,
    scored on held-out training classes; writes a table of every evaluation."""
    from deepmetric.training.tune import parse_param, tune as run_tune

    params = dict(parse_param(p) for p in param)
    result = run_tune(config, params, set_ or [], out, metric=metric, max_cycles=max_cycles, progress=progress,
                      echo=lambda line: out_console.print(line, highlight=False, markup=False))
    out_console.print((out / "tune.md").read_text(), highlight=False, markup=False)
    out_console.print(f"best: {result.search.best} (val {metric} {result.search.score:.4f}, "
                      f"{result.search.evaluations} runs); tables: {out / 'tune.md'}, {out / 'tune.csv'}",
                      highlight=False, markup=False)


class Kind(str, Enum):
    losses = "losses"
    regularizers = "regularizers"
    miners = "miners"
    distances = "distances"
    samplers = "samplers"
    augmenters = "augmenters"
    datasets = "datasets"
    backbones = "backbones"
    heads = "heads"


@app.command("list")
@friendly
def list_(kind: Annotated[Kind, typer.Argument(help="What to list.")]) -> None:
    """List what a config can name: losses, regularizers, miners, distances, samplers, augmenters, data sets,
    backbones or heads."""
    from rich.markup import escape

    from deepmetric import augment, data, distances, losses, miners, models, regularizers, samplers

    registry = {"losses": losses.LOSSES, "regularizers": regularizers.REGULARIZERS, "miners": miners.MINERS,
                "distances": distances.DISTANCES, "samplers": samplers.SAMPLERS, "augmenters": augment.AUGMENTERS,
                "datasets": data.DATASETS, "backbones": models.BACKBONES, "heads": models.HEADS}[kind.value]
    table = Table(title=kind.value)
    table.add_column("name")
    table.add_column("description")
    for name in registry.available():
        paragraph = " ".join((registry.get(name).__doc__ or "").strip().split("\n\n")[0].split())
        table.add_row(name, escape(paragraph.split(". ")[0].rstrip(":. ").replace("``", "")))
    if kind is Kind.backbones:
        for alias, target in models.backbones.ALIASES.items():
            table.add_row(alias, f"alias of {target}")
    out_console.print(table)
    if kind is Kind.backbones:
        out_console.print("Any timm or torchvision model name works too (e.g. resnet50, vit_small_patch16_224); "
                          "prefix 'timm:' or 'torchvision:' to pick the library.")


@config_app.command("show")
@friendly
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved configuration (defaults + file + overrides) as YAML."""
    from deepmetric.training import config as cfgmod

    cfg = cfgmod.load(config, set_)
    cfgmod.check_components(cfg)
    typer.echo(cfgmod.dump(cfg), nl=False)


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/demo"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train the digits demo (3 networks, a margin loss each; checkpoint chosen on held-out training classes; CPU, under a minute)
    and compare raw pixels, untrained and trained embeddings on the unseen classes."""
    from deepmetric.training.demo import run_demo

    summary = run_demo(out, overwrite=overwrite, overrides=set_ or [])
    from deepmetric.training.report import comparison_text, selection_text

    rows = {**summary["baselines"], "trained embedding": summary["test"]}
    out_console.print(metrics_table(rows, "digits: unseen classes 5-9, leave-one-out retrieval"))
    out_console.print(comparison_text(summary, summary["selected"]["metric"]))
    out_console.print(selection_text(summary["selected"]))
    out_console.print(f"report: {out / 'report' / 'report.html'}")


def _echo(line: str) -> None:
    out_console.print(line, highlight=False, markup=False)


@app.command()
@friendly
def transfer(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Transfer YAML (default: digits, "
                                                   "source classes 0-4, target classes 5-9).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key, e.g. --set episodes=5 "
                                                      "or --set source.train.epochs=5 (repeatable).")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="Shots per target class (repeatable; default 1 5 10 50).")] = None,
    n: Annotated[Optional[list[int]], typer.Option("--n", help="Ways: target classes per episode (repeatable; default 5).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the source runs, tables and plot.")] = Path("runs/transfer"),
    overwrite: Annotated[bool, typer.Option(help="Retrain the source runs even if finished runs are there.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the source runs' progress bars.")] = False,
) -> None:
    """k-shot transfer (Scott et al. 2018): weight transfer, DML embedding, prototypical network and adapted
    embeddings vs k; writes results.csv/.md and error_vs_k.png."""
    from deepmetric.fewshot.config import TransferConfig
    from deepmetric.fewshot.transfer import run_transfer
    from deepmetric.training import config as cfgmod

    overrides = [*(set_ or []), *([f"ks={list(k)}"] if k else []), *([f"ns={list(n)}"] if n else [])]
    cfg = cfgmod.load(config, overrides, root=TransferConfig)
    run_transfer(cfg, out, overwrite=overwrite, progress=progress, echo=_echo)
    _echo((out / "results.md").read_text())
    _echo(f"tables: {out / 'results.md'}, {out / 'results.csv'}; plot: {out / 'error_vs_k.png'}")


@app.command()
@friendly
def ood(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="ooDML YAML (default: digits).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key, e.g. --set generate.keep=4 "
                                                      "or --set source.train.epochs=5 (repeatable).")] = None,
    splits: Annotated[Optional[Path], typer.Option(help="Split file: published ooDML .pkl or generated .json "
                                                   "(default: generate from class-mean features).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the splits, runs, tables and plot.")] = Path("runs/ood"),
    overwrite: Annotated[bool, typer.Option(help="Retrain every split even if finished runs are there.")] = False,
    progress: Annotated[bool, typer.Option(help="Show the runs' progress bars.")] = False,
) -> None:
    """ooDML (Milbich et al. 2021): train/evaluate on class splits of increasing shift (FID), with few-shot
    adaptation; writes splits.json, results.csv/.md and ood.png."""
    from deepmetric.fewshot.config import OODConfig
    from deepmetric.fewshot.ood import run_ood
    from deepmetric.training import config as cfgmod

    cfg = cfgmod.load(config, [*(set_ or []), *([f"splits={splits}"] if splits else [])], root=OODConfig)
    run_ood(cfg, out, overwrite=overwrite, progress=progress, echo=_echo)
    _echo((out / "results.md").read_text())
    _echo(f"tables: {out / 'results.md'}, {out / 'results.csv'}; plot: {out / 'ood.png'}")


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class ExportFormat(str, Enum):
    onnx = "onnx"


CheckpointOpt = Annotated[str, typer.Option(help="Which checkpoint of a run folder: best or last.")]
ImageOpt = Annotated[Optional[list[Path]], typer.Option("--image", help="Query picture (repeatable); embedded by the "
                                                        "index's model (or --model).")]
EmbeddingOpt = Annotated[Optional[Path], typer.Option("--embedding", help="Embeddings file (.npz/.parquet/.npy): "
                                                      "every row is a query.")]
IdOpt = Annotated[Optional[list[str]], typer.Option("--id", help="A gallery item's id as the query (repeatable); the item itself is left out of its answers.")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="Run folder or exported .onnx that embeds --image "
                                                  "(default: the one the index was built from).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _hits_output(names: list[str], hits: list, as_json: bool, title: str) -> None:
    import json

    if as_json:
        typer.echo(json.dumps([{"query": n, "hits": [h.to_dict() for h in hs]} for n, hs in zip(names, hits)], indent=2))
        return
    for name, hs in zip(names, hits):
        table = Table(title=f"{title} {name}")
        for col, justify in (("rank", "right"), ("id", "left"), ("label", "right"), ("distance", "right"),
                             ("match", "left"), ("path", "left")):
            table.add_column(col, justify=justify)
        for h in hs:
            table.add_row(str(h.rank), h.id, "" if h.label is None else str(h.label), f"{h.distance:.4f}",
                          "" if h.match is None else ("yes" if h.match else "no"), h.path or "")
        out_console.print(table)


def _queries(index, image, embedding, id_, model, checkpoint):
    from deepmetric.product.queries import index_embedder, load_queries

    embedder = index_embedder(index, model, checkpoint) if image else None
    return load_queries(index, images=image or (), embeddings=embedding, ids=id_ or (), embedder=embedder)


@app.command()
@friendly
def embed(
    model: Annotated[Path, typer.Argument(help="A run folder (from `deepmetric train`) or an exported .onnx.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Embeddings file; the suffix picks the format: .npz, "
                                      ".parquet or .npy (+ .npy.json with ids, labels, paths).")],
    data: Annotated[Optional[str], typer.Option(help="A registered data set (`deepmetric list datasets`) or a folder "
                                                "with one sub-folder of images per class (default: the run's).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to embed (default: test; all for a folder).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Data set folder (default: the run's data.root).")] = None,
    checkpoint: CheckpointOpt = "best",
    batch_size: Annotated[int, typer.Option(min=1, help="Items per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Embed a data set with a trained model: vectors with sample ids, labels and image paths, in one file."""
    from deepmetric.product import embed_data, load_embedder
    from deepmetric.product.store import check_suffix

    check_suffix(out)  # before the work, not after
    embedder = load_embedder(model, checkpoint, device)
    file = embed_data(embedder, data, split, None if root is None else str(root), batch_size, progress)
    file.save(out)
    _echo(f"wrote {len(file)} embeddings of size {file.vectors.shape[1]} ({file.metadata['data']['name']}, split "
          f"{file.metadata['data']['split']}) to {out}")


@app.command("index")
@friendly
def index_(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings file from `deepmetric embed` (.npz/.parquet/.npy).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write (index.faiss, items.npz, "
                                      "metadata.json).")],
    kind: Annotated[IndexKind, typer.Option(help="flat (exact), hnsw or ivfpq (approximate); auto: flat below "
                                            "50,000 items, HNSW below 2 million, IVF-PQ above.")] = IndexKind.auto,
    overwrite: Annotated[bool, typer.Option(help="Replace an index already in --out.")] = False,
) -> None:
    """Build a faiss search index over embeddings; an approximate one reports its recall against exact search."""
    from deepmetric.errors import SearchIndexError
    from deepmetric.product import Embeddings, SearchIndex

    if (out / "index.faiss").exists() and not overwrite:
        raise SearchIndexError(f"{out} already holds an index: pass --overwrite to replace it")
    built = SearchIndex.from_embeddings(Embeddings.load(embeddings), kind.value)
    built.save(out)
    meta = built.metadata
    recall = "exact search" if meta["recall"] is None else f"recall@{meta['recall_k']} vs exact {meta['recall']:.4f}"
    _echo(f"indexed {meta['count']} items ({meta['kind']}: {meta['factory']}, {meta['distance']}, {recall}) in {out}")


@app.command()
@friendly
def search(
    index: Annotated[Path, typer.Argument(help="Index folder (from `deepmetric index`).")],
    image: ImageOpt = None,
    embedding: EmbeddingOpt = None,
    id_: IdOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per query.")] = 5,
    threshold: Annotated[Optional[float], typer.Option(help="Mark hits within this distance as matches (default: "
                                                      "the threshold `deepmetric calibrate` stored, if any).")] = None,
    model: ModelOpt = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint of --model: best or last.")] = None,
    json_: JsonOpt = False,
) -> None:
    """The k nearest gallery items of each query, with distances (cosine: 1 - cos), labels and paths."""
    from deepmetric.product import SearchIndex

    idx = SearchIndex.load(index)
    names, vectors = _queries(idx, image, embedding, id_, model, checkpoint)
    hits = idx.search_ids(names, k, threshold) if id_ else idx.search(vectors, k, threshold)
    _hits_output(names, hits, json_, "nearest to")


@app.command()
@friendly
def calibrate(
    index: Annotated[Path, typer.Argument(help="Index folder (from `deepmetric index`); the threshold is stored there.")],
    embeddings: Annotated[Path, typer.Option(help="Labelled embeddings file (from `deepmetric embed`): paired with "
                                             "the gallery, or within itself if the gallery has no labels.")],
    precision: Annotated[Optional[float], typer.Option(help="Target precision of accepted pairs, e.g. 0.95.")] = None,
    far: Annotated[Optional[float], typer.Option(help="Target false accept rate, e.g. 1e-3 (instead of --precision).")] = None,
) -> None:
    """Choose the match distance threshold for a target precision or FAR and store it in the index."""
    from deepmetric.product import Embeddings, SearchIndex
    from deepmetric.product.calibrate import calibrate as run_calibrate

    idx = SearchIndex.load(index)
    rec = run_calibrate(idx, Embeddings.load(embeddings), precision=precision, far=far, name=str(embeddings))
    idx.save(index)
    _echo(f"threshold {rec['threshold']:.4f} ({rec['distance']} distance): precision {rec['precision']:.4f}, "
          f"recall (TAR) {rec['recall']:.4f}, FAR {rec['far']:.4g} over {rec['pairs']} pairs "
          f"({rec['genuine_pairs']} genuine); stored in {index / 'metadata.json'}")


@app.command()
@friendly
def match(
    index: Annotated[Path, typer.Argument(help="Index folder with a calibrated threshold (`deepmetric calibrate`).")],
    image: ImageOpt = None,
    embedding: EmbeddingOpt = None,
    id_: IdOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Distance threshold (default: the stored one).")] = None,
    limit: Annotated[int, typer.Option(help="Look at most at this many nearest items per query.")] = 100,
    model: ModelOpt = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Checkpoint of --model: best or last.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Which gallery items match each query: the nearest items within the calibrated distance threshold."""
    from deepmetric.errors import CalibrationError
    from deepmetric.product import SearchIndex

    idx = SearchIndex.load(index)
    if threshold is None and idx.metadata.get("threshold") is None:
        raise CalibrationError(f"{index} has no stored threshold: run `deepmetric calibrate {index} --embeddings "
                               "FILE --precision 0.95` first, or pass --threshold")
    names, vectors = _queries(idx, image, embedding, id_, model, checkpoint)
    found = idx.search_ids(names, limit, threshold) if id_ else idx.search(vectors, limit, threshold)
    hits = [[h for h in hs if h.match] for hs in found]
    _hits_output(names, hits, json_, "matches of")


@app.command()
@friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `deepmetric train`.")],
    format_: Annotated[ExportFormat, typer.Option("--format", help="Export format (onnx).")] = ExportFormat.onnx,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Model file (default: RUN/export/model.onnx); "
                                                "its metadata goes beside it as .json.")] = None,
    checkpoint: CheckpointOpt = "best",
) -> None:
    """Export the run's model to ONNX (dynamic batch axis), checked against PyTorch with onnxruntime."""
    from deepmetric.product.export import export_run

    meta = export_run(run_dir, out, checkpoint)
    p = meta["parity"]
    _echo(f"wrote {meta['path']} (+ metadata .json); onnxruntime vs PyTorch max abs diff {p['max_abs_diff']:.2e} "
          f"on batches of {', '.join(map(str, p['batch_sizes']))} (tolerance {p['tolerance']:g})")


@app.command()
@friendly
def serve(
    index: Annotated[Path, typer.Argument(help="Index folder (from `deepmetric index`).")],
    model: Annotated[Optional[Path], typer.Option(help="Run folder or exported .onnx (default: the index's run).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    k: Annotated[int, typer.Option("--k", help="Hits per search unless the request asks otherwise.")] = 8,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image upload accepted, in MiB.")] = 4.0,
) -> None:
    """Serve INDEX: a web page (upload or pick a query image, see its top-k) and a JSON API (/search, /health)."""
    import uvicorn

    from deepmetric.product.serve import create_app

    web = create_app(index, model=model, k_default=k, max_upload_bytes=int(max_upload_mb * 2**20))
    _echo(f"serving {index} on http://{host}:{port}/ (Ctrl+C stops)")
    uvicorn.run(web, host=host, port=port, log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    app()

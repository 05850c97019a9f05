"""One :class:`Embedder` for a trained run (PyTorch checkpoint) or an exported ONNX model (onnxruntime).

``load_embedder(source)`` takes a run folder (its ``config.yaml`` and ``best`` / ``last`` checkpoint) or a
``.onnx`` file written by ``deepmetric export`` (with its ``.json`` metadata beside it). Both embed pictures
(:meth:`Embedder.embed_images`) exactly as the run's data set prepares its items, and whole data sets
(:meth:`Embedder.embed_dataset`); :func:`embed_data` adds ids, labels, paths and metadata for a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deepmetric import data
from deepmetric.errors import DataError, ExportError, RunFolderError
from deepmetric.product.inputs import input_spec, pictures_to_inputs, picture_transform
from deepmetric.product.store import Embeddings


class Embedder:
    """Maps model inputs to embeddings; knows the metric they live in and where the model came from.

    ``distance`` is the run's ``eval.distance`` (``cosine`` or ``euclidean``); ``normalize`` says whether the
    model L2-normalises its output; ``source`` is ``{"kind": "run" | "onnx", "path": ..., ...}``; ``input``
    is the spec of :mod:`deepmetric.product.inputs`; ``config`` the run's resolved config (a dict).
    """

    def __init__(self, forward: Callable[[torch.Tensor], np.ndarray], *, embedding_size: int, distance: str,
                 normalize: bool, source: dict[str, Any], input: dict[str, Any], config: dict[str, Any]):
        self._forward = forward
        self.embedding_size, self.distance, self.normalize = embedding_size, distance, normalize
        self.source, self.input, self.config = source, input, config

    def metadata(self) -> dict[str, Any]:
        """What an embeddings file or an index records about this embedder."""
        return {"embedding_size": self.embedding_size, "distance": self.distance, "normalize": self.normalize,
                "run": self.source, "config": self.config, "input": self.input}

    def embed_inputs(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings ``[n, D]`` float32 of a batch of model inputs."""
        return np.ascontiguousarray(self._forward(x), dtype=np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embeddings ``[n, D]`` float32 of pictures of any mode and size, prepared as the run's data set
        prepares its items (digits: greyscale, 8x8, ink in sixteenths; image data sets: the test transform)."""
        return self.embed_inputs(pictures_to_inputs(self.input, list(images)))

    def embed_dataset(self, dataset, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embeddings ``[N, D]`` float32 of ``dataset``'s items in order, ``batch_size`` at a time."""
        from deepmetric.training.progress import console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        chunks = []
        with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=not progress) as bar:
            task = bar.add_task("embed", total=len(dataset))
            for x, _ in loader:
                chunks.append(self.embed_inputs(x))
                bar.update(task, advance=len(x))
        if not chunks:
            raise DataError("the data set is empty: nothing to embed")
        return np.concatenate(chunks)


def _run_embedder(run_dir: Path, checkpoint: str, device: str) -> Embedder:
    from deepmetric.training.build import resolve_device
    from deepmetric.training.evaluate_run import load_run_model

    cfg, model, _ = load_run_model(run_dir, checkpoint)
    dev = resolve_device(device)
    model = model.to(dev).eval()

    @torch.no_grad()
    def forward(x: torch.Tensor) -> np.ndarray:
        return model(x.to(dev)).float().cpu().numpy()

    used = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not used.is_file():
        used = run_dir / "checkpoints" / "last.pt"
    source = {"kind": "run", "path": str(run_dir.resolve()), "checkpoint": checkpoint, "file": used.name}
    return Embedder(forward, embedding_size=cfg.model.embedding_size, distance=cfg.eval.distance,
                    normalize=cfg.model.normalize, source=source, input=input_spec(cfg),
                    config=cfg.model_dump(mode="json"))


def onnx_metadata_path(model_path: str | Path) -> Path:
    """Where ``deepmetric export`` writes the metadata of ``model.onnx``: ``model.json`` beside it."""
    return Path(model_path).with_suffix(".json")


def _onnx_embedder(path: Path, device: str) -> Embedder:
    import onnxruntime as ort

    meta_path = onnx_metadata_path(path)
    if not meta_path.is_file():
        raise ExportError(f"{path} has no metadata beside it ({meta_path.name}); export the model with "
                          "`deepmetric export RUN --format onnx`, which writes both")
    meta = json.loads(meta_path.read_text())
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.detach().cpu().float().numpy()})[0]

    source = {"kind": "onnx", "path": str(path.resolve()), "run": meta["run"]}
    return Embedder(forward, embedding_size=meta["embedding_size"], distance=meta["distance"],
                    normalize=meta["normalize"], source=source, input=meta["input"], config=meta["config"])


def load_embedder(source: str | Path, checkpoint: str = "best", device: str = "auto") -> Embedder:
    """An :class:`Embedder` from a run folder (``checkpoint``: ``best`` or ``last``) or an exported ``.onnx``."""
    path = Path(source)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ExportError(f"ONNX model not found: {path} (write one with `deepmetric export RUN --format onnx`)")
        return _onnx_embedder(path, device)
    if path.is_dir():
        return _run_embedder(path, checkpoint, device)
    raise RunFolderError(f"{path} is neither a run folder (the --out of `deepmetric train`) nor an exported "
                         "model (.onnx from `deepmetric export`)")


def open_data(embedder: Embedder, name: str | None = None, split: str | None = None,
              root: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The data set to embed and its description: a registered ``name`` (default: the run's own data set,
    ``split`` default ``test``) or a folder of class sub-folders (``split`` default ``all``), its pictures
    prepared as the embedder's inputs (a digits model embeds a folder of digit pictures).
    Returns ``(dataset, {"name", "split", "root", "kwargs"})``."""
    run_data = embedder.config["data"]
    name = name or run_data["name"]
    if name not in data.available():
        if not Path(name).is_dir():
            data.DATASETS.get(name)  # raises UnknownNameError with a suggestion
        name, root, split = "folder", name, split or "all"
    if root is None and name == run_data["name"]:
        root = run_data["root"]
    split = split or "test"
    kwargs = dict(run_data["kwargs"]) if name == run_data["name"] else {}
    params = data.DATASETS.parameters(name)
    extra = {"augment": False} if "augment" in params else {}
    transform = picture_transform(embedder.input)
    if transform is not None and "transform" in params:
        extra["transform"] = transform
    dataset = data.build(name, root=None if root is None else str(root), split=split, **kwargs, **extra)
    return dataset, {"name": name, "split": split, "root": None if root is None else str(root), "kwargs": kwargs}


def embed_data(embedder: Embedder, name: str | None = None, split: str | None = None, root: str | None = None,
               batch_size: int = 256, progress: bool = False) -> Embeddings:
    """Embed a data set (see :func:`open_data`): ids ``"<split>/<index>"``, its labels, its image paths if any."""
    dataset, desc = open_data(embedder, name, split, root)
    vectors = embedder.embed_dataset(dataset, batch_size=batch_size, progress=progress)
    paths = getattr(dataset, "paths", None)
    return Embeddings(vectors, [f"{desc['split']}/{i}" for i in range(len(dataset))], np.asarray(dataset.labels),
                      None if paths is None else [str(p) for p in paths], {**embedder.metadata(), "data": desc})

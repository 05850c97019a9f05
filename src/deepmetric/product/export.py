"""Exporting a run's model to ONNX with a dynamic batch axis, checked against PyTorch with onnxruntime.

torch's ``dynamo`` exporter (``torch.export`` + onnxscript, the default of torch 2.9+) writes one
self-contained file (``external_data=False``; models under 2 GB). Beside ``model.onnx`` goes
``model.json``: embedding size, distance, normalisation, the input spec and shape, the run and its config,
and the parity figures, which is what :func:`deepmetric.product.load_embedder` needs to serve the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmetric import data
from deepmetric.data.transforms import PIPELINES
from deepmetric.errors import ExportError
from deepmetric.product.embedder import onnx_metadata_path
from deepmetric.product.inputs import input_spec
from deepmetric.training.config import RunConfig

PARITY_TOLERANCE = 1e-4
PARITY_BATCHES = (1, 5)


def input_shape(cfg: RunConfig, spec: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one model input: ``[3, S, S]`` for images, else the shape of the run's first test item."""
    if spec["kind"] == "image":
        size = spec["size"] or PIPELINES[spec["pipeline"]]["size"]
        return (3, size, size)
    item = data.build(cfg.data.name, root=cfg.data.root, split=cfg.data.test_split, **cfg.data.kwargs)[0][0]
    return tuple(torch.as_tensor(item).shape)


def parity(model: nn.Module, path: Path, shape: tuple[int, ...], batch_sizes=PARITY_BATCHES, seed: int = 0) -> float:
    """Max abs difference between PyTorch and onnxruntime embeddings over random batches of each size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.rand(b, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"the ONNX model gives shape {got.shape} for a batch of {b}, PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_model(model: nn.Module, path: str | Path, shape: tuple[int, ...]) -> Path:
    """Write ``model`` (in eval mode, on CPU) to ``path`` as ONNX: input ``images [batch, *shape]``, output
    ``embeddings [batch, D]``, the batch axis dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = torch.rand(2, *shape)  # batch 2: torch.export specialises a size-1 axis
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
        except Exception as exc:  # noqa: BLE001 - torch.export and onnxscript raise many kinds
            raise ExportError(f"cannot export the model to ONNX: {type(exc).__name__}: {exc}") from exc
    return path


def export_run(run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "best") -> dict[str, Any]:
    """Export a run's model to ``out`` (default ``RUN/export/model.onnx``) with its metadata beside it; the
    PyTorch/onnxruntime parity is checked on batches of 1 and 5 and must be within :data:`PARITY_TOLERANCE`.
    Returns the metadata written (``parity.max_abs_diff`` among it)."""
    from deepmetric.training.evaluate_run import load_run_model

    run_dir = Path(run_dir)
    cfg, model, _ = load_run_model(run_dir, checkpoint)
    model = model.cpu().eval()
    spec = input_spec(cfg)
    shape = input_shape(cfg, spec)
    path = export_model(model, Path(out) if out else run_dir / "export" / "model.onnx", shape)
    diff = parity(model, path, shape)
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(f"the ONNX model differs from PyTorch by up to {diff:.3g} (tolerance {PARITY_TOLERANCE:g}); "
                          f"{path} was written but should not be used")
    meta = {
        "format": "onnx", "embedding_size": cfg.model.embedding_size, "distance": cfg.eval.distance,
        "normalize": cfg.model.normalize, "input": spec, "input_shape": [None, *shape],
        "run": {"kind": "run", "path": str(run_dir.resolve()), "checkpoint": checkpoint},
        "config": cfg.model_dump(mode="json"),
        "parity": {"max_abs_diff": diff, "batch_sizes": list(PARITY_BATCHES), "tolerance": PARITY_TOLERANCE},
    }
    onnx_metadata_path(path).write_text(json.dumps(meta, indent=2))
    return {**meta, "path": str(path)}

"""ONNX export: dynamic batch axis, onnxruntime parity with PyTorch on the digits run and a timm CNN."""

import json

import numpy as np
import pytest

from deepmetric.errors import RunFolderError
from deepmetric.product import embed_data, load_embedder
from deepmetric.product.export import PARITY_TOLERANCE, export_model, export_run, parity
from deepmetric.training.build import build_model
from deepmetric.training.config import load

pytestmark = pytest.mark.slow  # the exporter takes seconds per model


def test_digits_run_exports_with_parity_and_serves_through_load_embedder(run_dir, tmp_path):
    meta = export_run(run_dir, tmp_path / "m.onnx")
    assert meta["parity"]["max_abs_diff"] <= PARITY_TOLERANCE and meta["parity"]["batch_sizes"] == [1, 5]
    assert meta["input_shape"] == [None, 1, 8, 8]
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["embedding_size"] == 16 and written["distance"] == "cosine" and written["normalize"] is True
    onnx = load_embedder(tmp_path / "m.onnx")
    assert onnx.source["kind"] == "onnx" and onnx.source["run"]["path"] == str(run_dir.resolve())
    a, b = embed_data(onnx), embed_data(load_embedder(run_dir))
    assert a.ids == b.ids
    np.testing.assert_allclose(a.vectors, b.vectors, atol=PARITY_TOLERANCE)  # every test item, batches of 256


def test_a_timm_cnn_exports_with_a_dynamic_batch_axis(tmp_path):
    cfg = load(None, ["model.backbone=resnet18", "model.embedding_size=32"])
    model = build_model(cfg).eval()
    path = export_model(model, tmp_path / "resnet18.onnx", (3, 32, 32))
    assert parity(model, path, (3, 32, 32), batch_sizes=(1, 3)) <= PARITY_TOLERANCE


def test_export_needs_a_run(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        export_run(tmp_path)



def test_a_deep_ensemble_exports_as_one_model(tmp_path):
    cfg = load(None, ["model.embedding_size=24", "model.members=3", "model.backbone_kwargs={width: 4}"])
    model = build_model(cfg).eval()
    path = export_model(model, tmp_path / "ensemble.onnx", (1, 8, 8))
    assert parity(model, path, (1, 8, 8), batch_sizes=(1, 4)) <= PARITY_TOLERANCE

"""Every YAML file under configs/ loads, names registered components, and passes their keywords."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepmetric import data, losses, models
from deepmetric.data.benchmarks import BENCHMARKS
from deepmetric.data.transforms import build_transform
from deepmetric.training.build import build_miner
from deepmetric.training.objective import build_objective
from deepmetric.training.config import check_components, load

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_config_loads_and_components_exist(path):
    cfg = load(path)
    check_components(cfg)
    data.DATASETS.check_kwargs(cfg.data.name, cfg.data.kwargs)
    kw = cfg.data.kwargs
    if "pipeline" in kw or "normalization" in kw:
        build_transform(True, pipeline=kw.get("pipeline", "default"), normalization=kw.get("normalization", "imagenet"))
    build_objective(cfg, num_classes=3, num_samples=10, model=torch.nn.Identity())  # proxy losses get num_classes / embedding_size filled in
    build_miner(cfg)
    if path.parent != CONFIGS:  # configs/<data set>/<loss>.yaml
        assert cfg.data.name == path.parent.name and cfg.loss.name == path.stem
        head = path.read_text().split("\nseed:")[0]
        assert "Recall@1" in head and "--config configs/" in head  # the paper's number (or why there is none)
        if cfg.data.name == "inshop":
            assert (cfg.data.query_split, cfg.data.gallery_split) == ("query", "gallery")


def test_every_benchmark_has_the_same_methods():
    """One file per (data set, loss); a loss added later gets its four files together."""
    have = {key: {p.stem for p in (CONFIGS / key).glob("*.yaml")} for key in BENCHMARKS}
    reference = have["cub200"]
    assert {"multi_similarity", "triplet", "margin"} <= reference <= set(losses.available())
    assert all(stems == reference for stems in have.values()), have


def test_config_backbones_resolve():
    names = {load(p).model.backbone for p in FILES}
    unregistered = names - set(models.available())
    if unregistered:
        timm = pytest.importorskip("timm")
        assert all(timm.is_model(n) for n in unregistered), unregistered

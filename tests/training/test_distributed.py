"""DDP on CPU (gloo, 2 spawned processes) against one process on the concatenated batch.

One spawn (module fixture) runs every case of ``ddp_cases.py`` in both ranks; the single-process references
run here. Checked: every parameter's gradient (backbone, head, proxies, learnable margin) and the loss equal
one process's on the global batch, for a loss of each family; memory banks and per-sample loss state are
identical across ranks (and equal one process's); a run stopped after epoch 2 and resumed equals the
uninterrupted run bit for bit; sharded evaluation gives one process's metrics; the run folder is written once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import ddp_cases  # noqa: E402

from deepmetric.errors import ConfigError  # noqa: E402
from deepmetric.training import Trainer, load  # noqa: E402
from deepmetric.training.build import resolve_amp, resolve_device, resolve_distributed  # noqa: E402
from deepmetric.training.runfolder import read_records  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``{task: (rank 0 result, rank 1 result, folder)}`` of one spawn of 2 gloo processes."""
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(ddp_cases.run, args=(2, free_port(), str(root)), nprocs=2)
    return {task: tuple(torch.load(root / task / f"rank{r}.pt", weights_only=False) for r in range(2)) + (root / task,)
            for task in ddp_cases.TASKS}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return ddp_cases.gradients(tmp_path_factory.mktemp("single"), rank=0, world=1)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """``max |a - b| <= rel * max |b|`` (elementwise relative tests fail on gradients that cancel to ~0)."""
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-9


@pytest.mark.parametrize("case", list(ddp_cases.CASES))
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(ranks, single, case):
    r0, r1, _ = ranks["gradients"]
    for step, ((l0, g0), (l1, g1), (loss, grads)) in enumerate(zip(r0[case]["steps"], r1[case]["steps"],
                                                                   single[case]["steps"])):
        assert set(g0) == set(g1) == set(grads), "every parameter has a gradient on every rank"
        assert torch.equal(l0, l1)  # the loss of the global batch, on every rank
        rel = 1e-5 if step == 0 else 1e-3  # after updates, float32 rounding of the two runs has compounded
        assert close(l0, loss, rel)
        for name, g in grads.items():
            assert torch.equal(g0[name], g1[name]), f"{name}: ranks disagree"
            assert close(g0[name], g, rel), f"step {step}, {name}: DDP {g0[name].flatten()[:3]} vs one process {g.flatten()[:3]}"
    learnable = {"pair_margin": "objective.terms.margin.beta", "proxy_anchor": "objective.terms.proxy_anchor.proxies",
                 "members_margin": "objective.terms.margin.members.1.beta"}
    if case in learnable:  # loss parameters get the full gradient, not W times it
        assert learnable[case] in grads


@pytest.mark.parametrize("case", ["xbm_multi_similarity", "auprc_state", "proxy_anchor", "pair_margin"])
def test_memory_and_loss_state_stay_identical_across_ranks(ranks, single, case):
    r0, r1, _ = ranks["gradients"]
    for part in ("memory", "objective"):
        if single[case][part] is None:
            continue
        for name, value in single[case][part].items():
            torch.testing.assert_close(r0[case][part][name], r1[case][part][name], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(r0[case][part][name], value, rtol=1e-4, atol=1e-5, equal_nan=True)
    if case == "xbm_multi_similarity":  # 3 global batches of 32 through a queue of 48
        assert int(r0[case]["memory"]["count"]) == 48 and int(r0[case]["memory"]["ptr"]) == 96 % 48


def test_ddp_resume_equals_the_uninterrupted_run_and_rank_0_writes_once(ranks):
    r0, r1, folder = ranks["fit"]
    for key in ("full", "full_memory"):
        for name, value in r0[key].items():
            assert torch.equal(value, r0[key.replace("full", "resumed")][name]), f"{key} {name}: resumed differs"
            assert torch.equal(value, r1[key][name]), f"{key} {name}: ranks differ"
    full, cut = read_records(folder / "full"), read_records(folder / "cut")
    assert [r["epoch"] for r in full] == [r["epoch"] for r in cut] == [0, 1, 2, 3]  # one line per epoch
    for a, b in zip(full, cut):
        assert a.get("train/loss") == b.get("train/loss") and a["test/map@r"] == b["test/map@r"]
    steps = read_records(folder / "full", "steps.jsonl")
    assert [(r["epoch"], r["iteration"]) for r in steps] == [(1, 0), (2, 0), (3, 0)]
    assert json.loads((folder / "full" / "summary.json").read_text())["test"]["map@r"] == full[-1]["test/map@r"]


def test_sharded_evaluation_equals_one_process(ranks, tmp_path):
    _, _, folder = ranks["fit"]
    reference = Trainer(load(None, ddp_cases.FIT), tmp_path / "one", progress=False).evaluate()["test"]
    sharded = {k.split("/", 1)[1]: v for k, v in read_records(folder / "full")[0].items() if k.startswith("test/")}
    assert sharded.keys() == reference.keys()
    for name, value in reference.items():
        assert sharded[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
def test_torchrun_trains_with_the_cli(tmp_path):
    """``torchrun --nproc_per_node 2 deepmetric train``: one run folder, one record per epoch, rank 0 prints."""
    exe = shutil.which("deepmetric", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "--no-python", exe, "train", "--out", str(tmp_path / "run"), "--no-progress",
           "--set", "train.epochs=2", "--set", "train.iterations_per_epoch=2", "--set", "eval.tsne=false",
           "--set", "model.backbone_kwargs={width: 8}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    records = read_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test"]["map@r"] == records[-1]["test/map@r"]


def test_distributed_settings_are_checked(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_distributed("auto") is False
    with pytest.raises(ConfigError, match="torchrun"):
        resolve_distributed("on")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_distributed("auto") is True
    with pytest.raises(ConfigError, match="each would train alone"):
        resolve_distributed("off")
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        resolve_device("cuda:1", distributed=True)
    with pytest.raises(ConfigError, match="bf16"):
        resolve_amp("fp16", torch.device("cpu"))
    assert resolve_amp(True, torch.device("cpu")) is None and resolve_amp(True, torch.device("cuda")) is torch.float16
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16 and resolve_amp(False, torch.device("cuda")) is None


def test_torchrun_launch_needs_an_out_folder(monkeypatch):
    from typer.testing import CliRunner

    from deepmetric.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["train", "--set", "train.epochs=1"])
    assert result.exit_code == 2 and "--out" in result.output

"""Mixed precision: bf16 autocast on CPU agrees with float32, and the losses still compute in float32."""

import sys
from pathlib import Path

import torch

from deepmetric import distances
from deepmetric.training import Trainer, load

sys.path.insert(0, str(Path(__file__).parent))
from ddp_cases import BASE, global_batch  # noqa: E402


def step(tmp_path, amp, monkeypatch=None, seen=None):
    trainer = Trainer(load(None, BASE + [f"train.amp={amp}", "loss.name=multi_similarity"]), tmp_path / str(amp),
                      progress=False)
    x, y, ids = global_batch(trainer, world=1)
    if seen is not None:  # what the loss receives, and the dtype its similarities are computed in
        def record_input(_, args):
            seen["embeddings"] = args[0].dtype

        def record_output(self, *args, **kwargs):
            out = call(self, *args, **kwargs)
            seen["similarities"] = out.dtype
            return out

        call = distances.Distance.__call__
        trainer.objective.terms["multi_similarity"].register_forward_pre_hook(record_input)
        monkeypatch.setattr(distances.Distance, "__call__", record_output)
    loss, _ = trainer._forward_backward(x, y, ids, epoch=1)
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    return trainer, loss, grads


def test_bf16_on_cpu_agrees_with_float32_and_losses_stay_float32(tmp_path, monkeypatch):
    seen = {}
    trainer, loss16, grads16 = step(tmp_path, "bf16", monkeypatch, seen)
    assert trainer.amp_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()  # no scaler for bf16
    assert seen == {"embeddings": torch.bfloat16, "similarities": torch.float32}
    assert loss16.dtype == torch.float32
    _, loss32, grads32 = step(tmp_path, "false")
    # stated tolerance: bf16 keeps 8 bits of mantissa (relative error ~4e-3 per op)
    assert abs(float(loss16 - loss32)) <= 0.02 * abs(float(loss32))
    assert float(torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)) > 0.99
    assert float((grads16 - grads32).norm() / grads32.norm()) < 0.1


def test_bf16_training_runs_and_evaluates_under_autocast(tmp_path, fast_overrides):
    summary = Trainer(load(None, fast_overrides + ["train.amp=bf16"]), tmp_path / "run", progress=False).fit()
    assert 0 < summary["test"]["map@r"] <= 1

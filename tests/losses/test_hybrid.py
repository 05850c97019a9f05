"""The multi-head embedding model (deepmetric.models.multihead) and the hybrid pair + proxy loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric import losses, models
from deepmetric.errors import ConfigError, InputError
from deepmetric.models.multihead import MultiHeadEmbedding, NonLocalAttention
from deepmetric.training import Trainer
from deepmetric.training.build import build_model
from deepmetric.training.config import load

MULTI = ["model.head=multi_head", "model.backbone_kwargs={pool: none, width: 8}", "model.embedding_size=48"]


def multi_head_model(**head_kwargs):
    sets = MULTI + ([f"model.head_kwargs={head_kwargs}".replace("'", "")] if head_kwargs else [])
    torch.manual_seed(0)
    return build_model(load(None, sets))


def batch(n=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % classes


# ---------------------------------------------------------------------------------------------- the model


def test_multi_head_output_is_the_weighted_concatenation_of_the_heads():
    model = multi_head_model().eval()
    assert model.head.embedding_sizes == (16, 16, 16)  # 1 global + 2 part heads
    x, _ = batch()
    raw, out = model(x, return_raw=True)
    assert raw.shape == out.shape == (12, 48)
    heads = [F.normalize(z, dim=1) for z in raw.split(16, dim=1)]
    assert torch.allclose(out, torch.cat(heads, 1) / 3**0.5, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(12), atol=1e-6)
    # with head weights w, the squared distance is the w-weighted mean of the heads' squared distances
    w = torch.tensor([1.0, 2.0, 5.0])
    model.head.set_head_weights(w)
    out = model(x)
    d = (out[0] - out[1]).pow(2).sum()
    per_head = torch.stack([(h[0] - h[1]).pow(2).sum() for h in heads])
    assert d.item() == pytest.approx(((w / w.sum()) * per_head).sum().item(), rel=1e-5)


def test_non_local_attention_starts_as_identity_and_mixes_positions():
    att = NonLocalAttention(8)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(att(x), x)
    torch.nn.init.normal_(att.out.weight)
    y = att(x)
    # every output position depends on every input position (second-order affinities)
    x.requires_grad_(True)
    att(x)[0, :, 0, 0].sum().backward()
    assert bool((x.grad[0].abs().sum(0) > 0).all()) and not torch.allclose(y, x)


def test_multi_head_part_heads_see_their_own_stripe():
    head = MultiHeadEmbedding(4, 8, global_heads=0, parts=2, attention=False).eval()
    x = torch.zeros(1, 4, 4, 4, requires_grad=True)
    raw, _ = head(x, return_raw=True)
    raw[0, :4].sum().backward()  # part 1 = rows 0-1
    assert x.grad[0, :, 2:].abs().sum() == 0 and x.grad[0, :, :2].abs().sum() > 0


def test_multi_head_errors():
    with pytest.raises(ConfigError, match="multiple of 3"):
        MultiHeadEmbedding(4, 10)
    head = MultiHeadEmbedding(4, 6)
    with pytest.raises(InputError, match="pool: none"):
        head(torch.randn(2, 4))
    with pytest.raises(InputError, match="fewer parts"):
        MultiHeadEmbedding(4, 6, parts=3, global_heads=0)(torch.randn(2, 4, 2, 2))
    with pytest.raises(ConfigError, match="head 'multi_head' has no parameter 'part'"):
        from deepmetric.training.config import check_components
        check_components(load(None, MULTI + ["model.head_kwargs={part: 2}"]))


# ---------------------------------------------------------------------------------------------- the loss


def test_hybrid_equals_the_sum_of_its_parts():
    model = multi_head_model()
    x, y = batch()
    emb = model(x)
    loss = losses.build("hybrid", num_classes=4, embedding_size=48, model=model, lam=0.7)
    assert loss.sizes == [16, 16, 16]
    expected = 0
    for h, block in enumerate(emb.split(16, dim=1)):
        pa = losses.build("proxy_anchor", num_classes=4, embedding_size=16)  # an independent copy of head h's
        pa.load_state_dict(loss.proxy[h].state_dict())
        ms = losses.build("multi_similarity")
        expected = expected + pa(block, y) + 0.7 * ms(block, y)
    assert loss(emb, y).item() == pytest.approx(expected.item(), rel=1e-6)
    # λ = 0 leaves the proxy losses; one head is Proxy-Anchor + λ·MS on the whole embedding
    single = losses.build("hybrid", num_classes=4, embedding_size=48, lam=2.0)
    ref = single.proxy[0](emb, y) + 2.0 * losses.build("multi_similarity")(emb, y)
    assert single(emb, y).item() == pytest.approx(ref.item(), rel=1e-6)


def test_per_head_gradients_stay_isolated():
    model = multi_head_model()
    x, y = batch()
    emb = model(x)
    loss = losses.build("hybrid", num_classes=4, embedding_size=48, model=model)
    parts = loss.parts(emb, y)
    p, q = parts[1]  # head 1 only
    (p + q).backward()
    grads = [h[0].weight.grad for h in model.head.heads]
    assert grads[0] is None or grads[0].abs().sum() == 0
    assert grads[2] is None or grads[2].abs().sum() == 0
    assert grads[1].abs().sum() > 0
    assert loss.proxy[0].proxies.grad is None and loss.proxy[1].proxies.grad.abs().sum() > 0
    # and on the embedding itself: only head 1's columns
    e = emb.detach().requires_grad_(True)
    sum(a + b for a, b in loss.parts(e, y)[1:2]).backward()
    assert e.grad[:, :16].abs().sum() == 0 and e.grad[:, 32:].abs().sum() == 0 and e.grad[:, 16:32].abs().sum() > 0


def test_hybrid_members_and_errors():
    loss = losses.build("hybrid", num_classes=3, embedding_size=8, heads=[4, 4], proxy={"name": "proxy_nca_pp"},
                        pair={"name": "contrastive", "neg_margin": 0.8})
    assert type(loss.proxy[1]).__name__ == "ProxyNCAPPLoss" and loss.pair[0].neg_margin == 0.8
    with pytest.raises(ConfigError, match="add up"):
        losses.build("hybrid", num_classes=3, embedding_size=8, heads=[4, 5])
    with pytest.raises(InputError, match="dimensions"):
        loss(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ConfigError, match="miner"):
        loss(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), (torch.tensor([0]),) * 3)


def test_hybrid_gradcheck_float64():
    loss = losses.build("hybrid", num_classes=3, embedding_size=6, heads=2).double()
    x = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (x,))


def test_hybrid_trains_on_digits_with_the_multi_head_model(tmp_path, fast_overrides):
    cfg = load(None, fast_overrides + MULTI + ["objective=[{name: hybrid}, {name: sec, weight: 0.1}]",
                                               "optimizer.loss_lr_mult=100"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.objective.terms["hybrid"].sizes == [16, 16, 16]
    summary = trainer.fit()
    assert 0 < summary["test"]["recall@1"] <= 1
    with pytest.raises(ConfigError, match="miner"):
        Trainer(load(None, fast_overrides + MULTI + ["loss.name=hybrid", "miner.name=batch_hard"]), tmp_path / "x",
                progress=False)

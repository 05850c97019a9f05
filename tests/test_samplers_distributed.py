"""DistributedBatchSampler: each rank's share of one seeded epoch plan."""

import numpy as np
import pytest
import torch

from deepmetric.errors import ConfigError
from deepmetric.samplers import BatchSampler, DistributedBatchSampler, FixedRepresentativeSampler, MPerClassSampler

LABELS = np.repeat(np.arange(6), [8, 8, 7, 9, 8, 8])  # 48 samples, uneven classes


def shares(world, epoch=0, labels=LABELS, **kw):
    base = lambda: MPerClassSampler(labels, m=4, batch_size=8, seed=3, **kw)  # noqa: E731
    out = []
    for rank in range(world):
        s = DistributedBatchSampler(base(), rank, world)
        s.set_epoch(epoch)
        out.append(list(s))
    plan = base()
    plan.set_epoch(epoch)
    return out, list(plan)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 9])
def test_ranks_cover_the_plan_once_in_step_order_with_equal_step_counts(world):
    per_rank, plan = shares(world)
    steps = -(-len(plan) // world)
    assert all(len(batches) == steps for batches in per_rank)  # the same number of steps: no hanging collective
    interleaved = [per_rank[r][s] for s in range(steps) for r in range(world)]
    assert interleaved[: len(plan)] == plan  # step s, rank r = batch s*W + r of the plan
    assert interleaved[len(plan):] == plan[: steps * world - len(plan)]  # the last step topped up from the start
    for batches in per_rank:
        for batch in batches:  # each rank's batch keeps the P x m layout
            assert len(batch) == 8 and sorted(np.bincount(LABELS[batch])[LABELS[batch]]) == [4] * 8


def test_uneven_plans_are_padded_and_epochs_differ_but_repeat():
    per_rank, plan = shares(5)
    assert len(plan) % 5 and len(per_rank[0]) * 5 > len(plan)
    assert shares(2, epoch=1)[0] != shares(2, epoch=0)[0]
    assert shares(2, epoch=1)[0] == shares(2, epoch=1)[0]


def test_pair_rule_and_observe_apply_per_rank_block():
    labels = np.repeat(np.arange(4), 5)
    base = FixedRepresentativeSampler(labels, m=3, batch_size=6, seed=0, mining=True)
    s = DistributedBatchSampler(base, rank=1, world_size=2)
    rule = s.pair_rule(12, torch.device("cpu"))  # 2 ranks x (2 representatives + 2 x 2 others)
    assert rule.references.tolist() == [0, 1, 6, 7]
    assert rule.anchors.tolist() == [2, 3, 4, 5, 8, 9, 10, 11]
    ids = torch.tensor([0, 5, 1, 2, 6, 7, 10, 15, 11, 12, 16, 17])  # block 0 classes 0, 1; block 1 classes 2, 3
    emb = torch.eye(12)[:, :4] + 1
    s.observe(ids, emb)
    assert not np.isnan(base.class_embeddings).any()  # every class's representative seen in its own block
    assert DistributedBatchSampler(MPerClassSampler(LABELS, 4, 8), 0, 2).pair_rule(16, torch.device("cpu")) is None


def test_rank_outside_the_world_is_an_error():
    with pytest.raises(ConfigError, match="rank"):
        DistributedBatchSampler(MPerClassSampler(LABELS, 4, 8), 2, 2)


class Stateful(BatchSampler):
    """Four batches, each drawn from ``state`` when it is drawn (as fixed representatives' mining reads the
    embeddings observed so far)."""

    state = 0

    def __len__(self):
        return 4

    def __iter__(self):
        for _ in range(4):
            yield [self.state]


def test_batches_are_drawn_step_by_step_not_at_the_start_of_the_epoch():
    base = Stateful()
    steps = iter(DistributedBatchSampler(base, rank=1, world_size=2))
    assert next(steps) == [0]
    base.state = 7  # what observe() would change after the first step
    assert next(steps) == [7]

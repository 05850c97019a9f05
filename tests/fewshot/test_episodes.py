"""n-way k-shot episodes: exact class and support counts, no support/query overlap, seeding."""

import numpy as np
import pytest

from deepmetric.errors import ConfigError, DataError
from deepmetric.fewshot.episodes import EpisodeSampler, episode_from_support, episodes_from_published

LABELS = np.repeat(np.arange(8), [12, 9, 15, 7, 20, 10, 11, 6])  # uneven classes 0..7


@pytest.mark.parametrize("n,k,query", [(2, 1, None), (5, 3, None), (4, 5, 2), (8, 1, 5)])
def test_n_classes_k_support_no_overlap(n, k, query):
    sampler = EpisodeSampler(LABELS, n, k, query=query, episodes=6, seed=3)
    for ep in sampler:
        assert len(ep.classes) == n == len(np.unique(LABELS[ep.support]))
        assert set(LABELS[ep.support]) == set(ep.classes) == set(LABELS[ep.query])
        # exactly k support items per class, class-major, local labels 0..n-1 in the order of ep.classes
        np.testing.assert_array_equal(ep.support_labels, np.repeat(np.arange(n), k))
        np.testing.assert_array_equal(ep.classes[ep.support_labels], LABELS[ep.support])
        np.testing.assert_array_equal(ep.classes[ep.query_labels], LABELS[ep.query])
        assert len(np.intersect1d(ep.support, ep.query)) == 0
        assert len(np.unique(ep.support)) == len(ep.support) and len(np.unique(ep.query)) == len(ep.query)
        counts = np.bincount(ep.query_labels, minlength=n)
        if query is None:  # all the other items of each class
            np.testing.assert_array_equal(counts, np.bincount(LABELS)[ep.classes] - k)
        else:
            assert (counts == query).all()


def test_seeded_and_independent_of_order():
    a, b = EpisodeSampler(LABELS, 3, 2, seed=1), EpisodeSampler(LABELS, 3, 2, seed=1)
    later = b[4]  # drawing episode 4 first gives the same episode
    np.testing.assert_array_equal(a[4].support, later.support)
    np.testing.assert_array_equal(a[4].query, later.query)
    other = EpisodeSampler(LABELS, 3, 2, seed=2)
    assert any(not np.array_equal(a[i].support, other[i].support) for i in range(len(a)))


def test_classes_too_small_are_never_drawn_and_class_subset():
    sampler = EpisodeSampler(LABELS, 3, 6, query=3, episodes=20)  # needs 9 items: classes 3 (7) and 7 (6) are out
    drawn = np.unique(np.concatenate([ep.classes for ep in sampler]))
    assert set(drawn) <= {0, 1, 2, 4, 5, 6} and 3 not in drawn and 7 not in drawn
    held_out = EpisodeSampler(LABELS, 2, 1, classes=[5, 6, 7], episodes=10)
    assert set(np.concatenate([ep.classes for ep in held_out])) <= {5, 6, 7}


def test_clear_errors():
    with pytest.raises(DataError, match="only 2 of the 8 classes"):
        EpisodeSampler(LABELS, 3, 10, query=5)
    with pytest.raises(ConfigError, match="n_way"):
        EpisodeSampler(LABELS, 1, 1)
    with pytest.raises(ConfigError, match="k_shot"):
        EpisodeSampler(LABELS, 2, 0)
    with pytest.raises(ConfigError, match="query"):
        EpisodeSampler(LABELS, 2, 1, query=0)
    with pytest.raises(IndexError):
        EpisodeSampler(LABELS, 2, 1, episodes=2)[2]


def test_episode_from_support_uses_the_rest_as_queries():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1])
    ep = episode_from_support(labels, [4, 0, 8, 2])  # classes 0 and 1 only
    np.testing.assert_array_equal(ep.classes, [0, 1])
    np.testing.assert_array_equal(ep.support, [0, 2, 4, 8])
    np.testing.assert_array_equal(ep.support_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(ep.query, [1, 5])
    np.testing.assert_array_equal(ep.query_labels, [1, 0])
    with pytest.raises(DataError, match="twice"):
        episode_from_support(labels, [0, 0])


def test_published_episodes_match_files_within_their_class():
    labels = np.array([0, 0, 0, 1, 1, 1])
    paths = ["/d/a/x.jpg", "/d/a/y.jpg", "/d/a/z.jpg", "/d/b/x.jpg", "/d/b/u.jpg", "/d/b/v.jpg"]
    eps = episodes_from_published(labels, ["a", "b"], paths, {1: {"a": ["y.jpg"], "b": ["x.jpg"]},
                                                               2: {"a": ["x.jpg"], "b": ["v.jpg"]}})
    np.testing.assert_array_equal(eps[0].support, [1, 3])  # b's x.jpg is item 3, not a's item 0
    np.testing.assert_array_equal(eps[0].query, [0, 2, 4, 5])
    np.testing.assert_array_equal(eps[1].support, [0, 5])
    with pytest.raises(DataError, match="not in the data set"):
        episodes_from_published(labels, ["a", "b"], paths, {1: {"a": ["nope.jpg"]}})

"""Coordinate-descent search (deepmetric.tuning)."""

from __future__ import annotations

import math

import pytest

from deepmetric.errors import ConfigError
from deepmetric.tuning import coordinate_descent, log_grid

LAMBDAS = log_grid(0.125, 8, 7)  # 0.125 ... 8, factor 2
MARGINS = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2]


def test_log_grid():
    assert LAMBDAS == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    with pytest.raises(ConfigError):
        log_grid(0, 1, 3)


def test_finds_the_known_optimum_in_few_evaluations():
    calls = []

    def score(p):
        calls.append(dict(p))
        return -(math.log2(p["lambda"]) - 1) ** 2 - 10 * (p["margin"] - 0.6) ** 2  # best: λ = 2, m = 0.6

    result = coordinate_descent(score, {"lambda": LAMBDAS, "margin": MARGINS})
    assert result.best == {"lambda": 2.0, "margin": 0.6}
    assert result.score == pytest.approx(0.0)
    assert len(calls) == result.evaluations <= 8 < len(LAMBDAS) * len(MARGINS)  # 42 points in the grid
    assert len({tuple(c.values()) for c in calls}) == len(calls)  # no point evaluated twice
    assert [e.order for e in result.history] == list(range(len(calls)))


def test_coupled_objective_needs_a_second_cycle_and_minimisation():
    # the best margin depends on λ: the first cycle ends off the optimum, the second reaches it
    def loss(p):
        best_margin = 0.2 * math.log2(p["lambda"]) + 0.4
        return (math.log2(p["lambda"]) - 2) ** 2 + 5 * (p["margin"] - best_margin) ** 2

    result = coordinate_descent(loss, {"lambda": LAMBDAS, "margin": MARGINS}, start={"lambda": 0.5, "margin": 0.2},
                                maximize=False)
    assert result.best == {"lambda": 4.0, "margin": 0.8} and result.score == pytest.approx(0.0)
    assert result.cycles >= 2 and result.evaluations < len(LAMBDAS) * len(MARGINS)


def test_nan_scores_lose_and_start_is_checked():
    result = coordinate_descent(lambda p: math.nan if p["x"] > 2 else p["x"], {"x": [1, 2, 3, 4]})
    assert result.best == {"x": 2}
    with pytest.raises(ConfigError, match="not in its grid"):
        coordinate_descent(lambda p: 0.0, {"x": [1, 2]}, start={"x": 5})
    with pytest.raises(ConfigError, match="not searched"):
        coordinate_descent(lambda p: 0.0, {"x": [1, 2]}, start={"y": 1})
    with pytest.raises(ConfigError, match="twice"):
        coordinate_descent(lambda p: 0.0, {"x": [1, 1]})

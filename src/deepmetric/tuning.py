"""Coordinate-descent search over a few hyper-parameters, e.g. the balance of a contrastive loss.

Sors, Sampaio de Rezende, Ibrahimi & Andreoli (2021, arXiv 2112.11743) [recon]: the balance between the
positive and the negative ("entropy") term of a contrastive loss — λ, the temperature or the margin, and
the batch size — is a hyper-parameter to optimise, one coordinate at a time with the others fixed, on the
validation metric, cycling until no coordinate improves.

:func:`coordinate_descent` does that on discrete grids (a log-grid per coordinate, :func:`log_grid`): the
1-D search on a coordinate steps from the current value to the better neighbour and keeps going while the
score improves (a line search for a unimodal score on the grid). Every point is evaluated at most once
(evaluations are cached), so a training run is never repeated. ``deepmetric tune``
(:mod:`deepmetric.training.tune`) evaluates a point by a short training run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepmetric.errors import ConfigError


def log_grid(low: float, high: float, num: int) -> list[float]:
    """``num`` values from ``low`` to ``high``, evenly spaced in log scale (both ends included)."""
    if not 0 < low < high or num < 2:
        raise ConfigError(f"log_grid needs 0 < low < high and num >= 2, got {low}, {high}, {num}")
    step = (math.log(high) - math.log(low)) / (num - 1)
    return [float(f"{math.exp(math.log(low) + i * step):.6g}") for i in range(num)]


@dataclass
class Evaluation:
    """One evaluated point: its coordinates, its score, and when it was evaluated (0-based)."""

    point: dict[str, Any]
    score: float
    order: int


@dataclass
class SearchResult:
    """The best point and score, and every evaluation in the order they were made."""

    best: dict[str, Any]
    score: float
    history: list[Evaluation] = field(default_factory=list)
    cycles: int = 0

    @property
    def evaluations(self) -> int:
        return len(self.history)


def coordinate_descent(
    objective: Callable[[dict[str, Any]], float],
    grids: Mapping[str, Sequence[Any]],
    start: Mapping[str, Any] | None = None,
    max_cycles: int = 5,
    maximize: bool = True,
) -> SearchResult:
    """Maximise (or minimise) ``objective(point)`` over the product of ``grids`` (name -> ordered values),
    one coordinate at a time.

    ``start`` gives each coordinate's first value (a grid value; default: the middle of its grid). A cycle
    line-searches every coordinate in turn; the search stops after a cycle that moved nothing, or after
    ``max_cycles``. Only strictly better scores move the point; NaN scores count as worst.
    """
    if not grids:
        raise ConfigError("coordinate_descent needs at least one coordinate to search")
    grids = {k: list(v) for k, v in grids.items()}
    for name, values in grids.items():
        if not values:
            raise ConfigError(f"the grid of {name!r} is empty")
        if len(set(map(_key, values))) != len(values):
            raise ConfigError(f"the grid of {name!r} lists a value twice: {values}")
    index = {k: len(v) // 2 for k, v in grids.items()}
    for name, value in (start or {}).items():
        if name not in grids:
            raise ConfigError(f"start names {name!r}, which is not searched ({', '.join(grids)})")
        keys = [_key(v) for v in grids[name]]
        if _key(value) not in keys:
            raise ConfigError(f"the start value {value!r} of {name!r} is not in its grid {grids[name]}")
        index[name] = keys.index(_key(value))

    sign = 1.0 if maximize else -1.0
    cache: dict[tuple, float] = {}
    history: list[Evaluation] = []

    def score(idx: Mapping[str, int]) -> float:
        key = tuple(idx[k] for k in grids)
        if key not in cache:
            point = {k: grids[k][i] for k, i in idx.items()}
            value = float(objective(dict(point)))
            history.append(Evaluation(point, value, len(history)))
            cache[key] = -math.inf if math.isnan(value) else sign * value
        return cache[key]

    best = score(index)
    cycles = 0
    for cycles in range(1, max_cycles + 1):
        moved = False
        for name in grids:
            for direction in (1, -1):
                while 0 <= index[name] + direction < len(grids[name]):
                    trial = {**index, name: index[name] + direction}
                    value = score(trial)
                    if value <= best:
                        break
                    index, best, moved = trial, value, True
        if not moved:
            break
    point = {k: grids[k][i] for k, i in index.items()}
    return SearchResult(point, sign * best, history, cycles)


def _key(value: Any) -> Hashable:
    return repr(value)

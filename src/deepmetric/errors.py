"""Every exception deepmetric raises on purpose.

Each one says what was wrong and how to fix it. They all derive from :class:`DeepMetricError`
(and from the matching built-in, so ``except ValueError`` keeps working).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeepMetricError(Exception):
    """Base class of all deepmetric errors."""


class ConfigError(DeepMetricError, ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


class UnknownNameError(DeepMetricError, KeyError):
    """A registry key (loss, miner, data set, backbone, ...) does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InputError(DeepMetricError, ValueError):
    """Embeddings or labels given to a loss, miner or metric are malformed."""


class LabelError(InputError):
    """Labels are not integers, have the wrong shape, or do not match the embeddings."""


class DataError(DeepMetricError, ValueError):
    """A data set folder or file is missing, incomplete or malformed."""


class BackboneWeightsError(DeepMetricError, RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (typically: offline, not cached)."""


class TrainingDivergedError(DeepMetricError, RuntimeError):
    """The training loss became NaN or Inf; the last good checkpoint is kept."""


class RunFolderError(DeepMetricError, FileExistsError):
    """The output folder already holds a run (use --resume or --overwrite), or is not a run folder."""


class SearchIndexError(DeepMetricError, ValueError):
    """A search index folder is missing or malformed, or does not fit the model or queries used with it."""


class CalibrationError(DeepMetricError, ValueError):
    """A match threshold cannot be chosen (unlabelled set, unreachable target) or none is stored."""


class ExportError(DeepMetricError, RuntimeError):
    """A model cannot be exported, or an exported model does not reproduce the PyTorch one."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' if nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""

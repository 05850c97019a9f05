"""Training: validated configs, the trainer with hooks and exact resume, checkpoints, reports."""

from deepmetric.training.config import RunConfig, load, validate
from deepmetric.hooks import Hook
from deepmetric.training.trainer import Trainer

__all__ = ["RunConfig", "load", "validate", "Hook", "Trainer"]

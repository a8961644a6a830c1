"""Evaluation: a checkpoint on any task and length, length extrapolation, accuracy by distance,
perplexity by position; results go to the run's ``record.json`` and to W&B (``hybrid-eval``)."""

from hybrid.eval.evaluate import evaluate
from hybrid.eval.extrapolation import extrapolation_lengths, task_at_length
from hybrid.eval.loading import load_run

__all__ = ["evaluate", "extrapolation_lengths", "load_run", "task_at_length"]

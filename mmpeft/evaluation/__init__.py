"""Evaluation: predictions on a split -> metrics. Zero-shot and fine-tuned runs share this one path."""

from mmpeft.evaluation.classify import predict
from mmpeft.evaluation.metrics import classification_metrics

__all__ = ["classification_metrics", "predict"]

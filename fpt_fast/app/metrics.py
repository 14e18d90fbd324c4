"""Classification metrics of the FPT papers (acc, F1, AUC, precision, recall, quadratic-weighted kappa)
and their efficiency scores PPE and PME (docs/method.md, section 8), in numpy.

Conventions (they match scikit-learn's defaults, which the tests compare against):
- precision, recall, F1: macro averages over the classes that occur in the labels or the
  predictions; a class never predicted has precision 0, one never present has recall 0.
- AUC: binary ROC AUC of class 1 for two classes; otherwise the one-vs-rest macro average over the
  classes that have both positive and negative samples (scikit-learn raises instead when a class
  is missing from the labels; a validation split without some class still gets a score here).
  NaN when no class qualifies.
- kappa: Cohen's kappa with quadratic weights (i - j)^2 over the class indices 0..C-1.
- Non-finite probabilities (a diverged model): every metric is NaN, never a score (NaN scores
  would otherwise rank the samples in their listing order); the confusion matrix counts the
  samples whose probabilities are finite.
"""
from __future__ import annotations

import math
from typing import Dict

import numpy as np

METRIC_ORDER = ("acc", "f1", "auc", "precision", "recall", "kappa")


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predicted classes."""
    labels, predictions = _numpy(labels).astype(np.int64), _numpy(predictions).astype(np.int64)
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got range "
                             f"[{values.min()}, {values.max()}]")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def macro_precision_recall_f1(confusion: np.ndarray):
    """Macro precision, recall and F1 over the classes present in labels or predictions."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    present = (predicted + actual) > 0
    if not present.any():
        return math.nan, math.nan, math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.concatenate(([True], sorted_x[1:] != sorted_x[:-1])))
    ends = np.concatenate((starts[1:], [len(x)]))
    run = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = (starts[run] + ends[run] + 1) / 2.0
    return ranks


def binary_auc(scores, positive) -> float:
    """ROC AUC of scores for the boolean mask positive (Mann-Whitney U with tied ranks averaged);
    NaN when either class is empty or a score is not finite."""
    scores, positive = _numpy(scores).astype(np.float64), _numpy(positive).astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(scores).all():
        return math.nan
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(labels, probabilities) -> float:
    """labels (N,) int, probabilities (N, C). Binary AUC of class 1 when C == 2, else one-vs-rest macro."""
    labels, probabilities = _numpy(labels).astype(np.int64), _numpy(probabilities).astype(np.float64)
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return binary_auc(probabilities[:, 1], labels == 1)
    per_class = [binary_auc(probabilities[:, c], labels == c) for c in range(num_classes)]
    valid = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(valid)) if valid else math.nan


def quadratic_weighted_kappa(confusion: np.ndarray) -> float:
    """Cohen's kappa with weights (i - j)^2; NaN when the expected disagreement is 0."""
    confusion = confusion.astype(np.float64)
    num_classes = confusion.shape[0]
    index = np.arange(num_classes)
    weights = (index[:, None] - index[None, :]) ** 2
    total = confusion.sum()
    if total == 0:
        return math.nan
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / total
    denominator = (weights * expected).sum()
    if denominator == 0:
        return math.nan
    return float(1.0 - (weights * confusion).sum() / denominator)


def classification_metrics(labels, probabilities) -> Dict[str, object]:
    """All metrics of the papers for labels (N,) and class probabilities (N, C).

    Returns {"acc", "f1", "auc", "precision", "recall", "kappa": float, "confusion": (C, C) list}.
    """
    labels, probabilities = _numpy(labels).astype(np.int64), _numpy(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities (shape {probabilities.shape}) must be (N, C) with N = "
                         f"{labels.shape[0]} labels")
    num_classes = probabilities.shape[1]
    finite = np.isfinite(probabilities).all(axis=1)
    predictions = probabilities.argmax(axis=1)
    confusion = confusion_matrix(labels[finite], predictions[finite], num_classes)
    if not finite.all():
        nan = math.nan
        return {"acc": nan, "f1": nan, "auc": nan, "precision": nan, "recall": nan, "kappa": nan,
                "confusion": confusion.tolist()}
    precision, recall, f1 = macro_precision_recall_f1(confusion)
    return {
        "acc": float((predictions == labels).mean()) if len(labels) else math.nan,
        "f1": f1,
        "auc": roc_auc(labels, probabilities),
        "precision": precision,
        "recall": recall,
        "kappa": quadratic_weighted_kappa(confusion),
        "confusion": confusion.tolist(),
    }


def ppe(score: float, learnable_share: float) -> float:
    """Parameter efficiency: score * exp(-log10(r + 1)), r the learnable-parameter fraction (0..1)."""
    if not 0.0 <= learnable_share <= 1.0:
        raise ValueError(f"learnable_share={learnable_share!r} must be a fraction in [0, 1]")
    return score * math.exp(-math.log10(learnable_share + 1.0))


def pme(score: float, memory: float, full_memory: float) -> float:
    """Memory efficiency: score * exp(-log10(m / m_full + 1)), m_full full fine-tuning's memory."""
    if memory < 0 or full_memory <= 0:
        raise ValueError(f"memory={memory!r} must be >= 0 and full_memory={full_memory!r} > 0")
    return score * math.exp(-math.log10(memory / full_memory + 1.0))

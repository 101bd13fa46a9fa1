"""Task metrics: accuracy, binary F1, Matthews correlation, Pearson, Spearman, GSM8K accuracy.

The functions take numpy arrays, lists or jax arrays. ``accuracy``, ``binary_f1``, ``pearson``
and ``matthews_corrcoef`` (given ``num_classes``) use only array operations of the input's own
namespace, so they also run on jax arrays inside ``jax.jit``; with numpy input they return Python
floats. ``spearman`` (ranks from ``scipy.stats.rankdata``) and :func:`task_metrics` run on the
host. Degenerate inputs follow scikit-learn: F1 and MCC are 0 when undefined; Pearson and Spearman
are nan for a constant input. :data:`METRIC_RANGES` holds the values each metric can take.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from fedlora_jax.data.gsm8k import extract_gsm8k_answer
from fedlora_jax.data.text import GLUE_TASKS

# The values each metric can take (a loss has no upper bound); ``compare`` clips intervals to them.
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "token_accuracy": (0.0, 1.0),
    "mcc": (-1.0, 1.0), "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0),
    "loss": (0.0, math.inf),
}


def _namespace(*arrays: Any):
    """numpy or jax.numpy, whichever the inputs live in. The evaluators call the metrics on host
    numpy arrays, but they are also public pure functions a caller can jit on device arrays, which
    scipy's counterparts (``scipy.stats.pearsonr``, ...) cannot be: hence array operations both share."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp, [jnp.asarray(a) for a in arrays]
    return np, [np.asarray(a) for a in arrays]


def _check_pair(predictions, labels, name: str) -> None:
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(
            f"{name}: predictions {predictions.shape} and labels {labels.shape} must be equal 1-D"
        )
    if predictions.shape[0] == 0:
        raise ValueError(f"{name}: no examples")


def _result(xp, value):
    return float(value) if xp is np else value


def accuracy(predictions: Any, labels: Any) -> float:
    """Share of predictions equal to their labels.

    Args:
      predictions: [N] predicted class ids.
      labels: [N] true class ids.

    Returns:
      Accuracy in [0, 1].
    """
    xp, (predictions, labels) = _namespace(predictions, labels)
    _check_pair(predictions, labels, "accuracy")
    return _result(xp, xp.mean((predictions == labels).astype(xp.float32)))


def binary_f1(predictions: Any, labels: Any) -> float:
    """F1 score of the positive class 1 (0 when there are no true or predicted positives).

    Args:
      predictions: [N] predicted class ids in {0, 1}.
      labels: [N] true class ids in {0, 1}.

    Returns:
      F1 = 2 TP / (2 TP + FP + FN).
    """
    xp, (predictions, labels) = _namespace(predictions, labels)
    _check_pair(predictions, labels, "binary_f1")
    predicted, actual = predictions == 1, labels == 1
    true_pos = xp.sum(predicted & actual).astype(xp.float32)
    denominator = xp.sum(predicted).astype(xp.float32) + xp.sum(actual).astype(xp.float32)
    safe = xp.where(denominator > 0, denominator, 1.0)
    return _result(xp, xp.where(denominator > 0, 2.0 * true_pos / safe, 0.0))


def matthews_corrcoef(predictions: Any, labels: Any, num_classes: int | None = None) -> float:
    """Matthews correlation coefficient, binary or multiclass (Gorodkin's R_K).

    Args:
      predictions: [N] predicted class ids.
      labels: [N] true class ids.
      num_classes: C; None takes 1 + the largest id seen (host only; give it under jit).

    Returns:
      MCC in [-1, 1]; 0 when undefined (a constant prediction or label vector).
    """
    xp, (predictions, labels) = _namespace(predictions, labels)
    _check_pair(predictions, labels, "matthews_corrcoef")
    if num_classes is None:
        num_classes = int(max(np.max(np.asarray(predictions)), np.max(np.asarray(labels)))) + 1
    classes = xp.arange(num_classes)
    predicted = (predictions[:, None] == classes).astype(xp.float32)  # [N, C]
    actual = (labels[:, None] == classes).astype(xp.float32)  # [N, C]
    n = xp.asarray(predictions.shape[0], dtype=xp.float32)
    correct = xp.sum(predicted * actual)
    p_k, t_k = xp.sum(predicted, axis=0), xp.sum(actual, axis=0)
    covariance = correct * n - xp.sum(p_k * t_k)
    denominator = xp.sqrt((n * n - xp.sum(p_k * p_k)) * (n * n - xp.sum(t_k * t_k)))
    safe = xp.where(denominator > 0, denominator, 1.0)
    return _result(xp, xp.where(denominator > 0, covariance / safe, 0.0))


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation of two [N] score vectors (nan if either is constant)."""
    xp, (predictions, labels) = _namespace(predictions, labels)
    _check_pair(predictions, labels, "pearson")
    x = predictions.astype(xp.float64 if xp is np else xp.float32)
    y = labels.astype(x.dtype)
    x, y = x - xp.mean(x), y - xp.mean(y)
    denominator = xp.sqrt(xp.sum(x * x) * xp.sum(y * y))
    safe = xp.where(denominator > 0, denominator, 1.0)
    return _result(xp, xp.where(denominator > 0, xp.sum(x * y) / safe, xp.nan))


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks of an [N] vector; tied values share the average of their ranks.

    Returns:
      [N] float64 ranks (``scipy.stats.rankdata(method="average")``).
    """
    return scipy_stats.rankdata(np.asarray(values), method="average").astype(np.float64)


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation of two [N] vectors (ties get average ranks; host only).

    The Pearson correlation of the average ranks, which is what ``scipy.stats.spearmanr``
    returns; through :func:`pearson` a constant input gives nan quietly, without spearmanr's
    ConstantInputWarning (an untrained regressor often predicts one value).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    _check_pair(predictions, labels, "spearman")
    return pearson(average_ranks(predictions), average_ranks(labels))


def gsm8k_accuracy(generations: Sequence[str], references: Sequence[str]) -> float:
    """Share of generations whose final number equals the reference's.

    A generation's answer is the number after its last ``####``, else the last number in it.

    Args:
      generations: N generated solutions.
      references: N reference final answers (``"72"``) or full reference solutions.

    Returns:
      Exact-match accuracy in [0, 1] (numbers compared as values: ``"18.0"`` equals ``"18"``).
    """
    if len(generations) != len(references) or not generations:
        raise ValueError(
            f"gsm8k_accuracy: {len(generations)} generations vs {len(references)} references"
        )
    correct = 0
    for generation, reference in zip(generations, references):
        truth = extract_gsm8k_answer(reference) or reference.strip().replace(",", "")
        answer = _final_number(generation)
        correct += answer is not None and math.isclose(float(answer), float(truth), abs_tol=1e-6)
    return correct / len(generations)


def _final_number(text: str) -> str | None:
    answer = extract_gsm8k_answer(text)
    if answer is not None:
        return answer
    numbers = [
        token.replace(",", "").rstrip(".")
        for token in text.replace("$", " ").split()
        if any(ch.isdigit() for ch in token)
    ]
    for token in reversed(numbers):
        try:
            float(token)
            return token
        except ValueError:
            continue
    return None


def task_metrics(task_name: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The standard metrics of a GLUE task (or GSM8K).

    Accuracy for every classification task, plus F1 for MRPC and QQP and MCC for CoLA; Pearson
    and Spearman for STS-B; exact-match accuracy for ``gsm8k`` (predictions and labels are then
    lists of strings).

    Args:
      task_name: a key of ``GLUE_TASKS``, or ``gsm8k``.
      predictions: [N] class ids or [N, C] logits (argmax taken); [N] scores for STS-B.
      labels: [N] true class ids or scores.

    Returns:
      metric name -> value (Python floats).
    """
    if task_name == "gsm8k":
        return {"accuracy": gsm8k_accuracy(predictions, labels)}
    if task_name not in GLUE_TASKS:
        raise ValueError(f"unknown task {task_name!r} (known: {', '.join(GLUE_TASKS)}, gsm8k)")
    info = GLUE_TASKS[task_name]
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if info.is_regression and predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    elif not info.is_regression and predictions.ndim == 2:
        predictions = np.argmax(predictions, axis=-1)
    functions = {
        "accuracy": accuracy,
        "f1": binary_f1,
        "mcc": lambda p, y: matthews_corrcoef(p, y, info.num_labels),
        "pearson": pearson,
        "spearman": spearman,
    }
    return {name: float(functions[name](predictions, labels)) for name in info.metrics}

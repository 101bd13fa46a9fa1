"""Task metrics against scipy and hand-computed values (scikit-learn is not a dependency)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedlora_jax.eval.metrics import (
    METRIC_RANGES,
    accuracy,
    average_ranks,
    binary_f1,
    gsm8k_accuracy,
    matthews_corrcoef,
    pearson,
    spearman,
    task_metrics,
)

LABELS = np.array([1, 1, 1, 0, 0, 0])
PREDICTIONS = np.array([1, 0, 1, 0, 0, 1])  # TP 2, FN 1, TN 2, FP 1


def test_binary_metrics_hand_computed():
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(4 / 6)
    assert binary_f1(PREDICTIONS, LABELS) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / 9
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(1 / 3)
    assert isinstance(accuracy(PREDICTIONS.tolist(), LABELS.tolist()), float)


def test_binary_mcc_is_the_phi_coefficient():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    predictions = np.where(rng.random(500) < 0.7, labels, 1 - labels)
    phi = stats.pearsonr(predictions, labels).statistic
    assert matthews_corrcoef(predictions, labels) == pytest.approx(phi, abs=1e-6)


def test_multiclass_mcc_matches_covariance_definition():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    predictions = np.where(rng.random(400) < 0.5, labels, rng.integers(0, 4, 400))
    x, y = np.eye(4)[predictions], np.eye(4)[labels]  # one-hot [N, K]

    def cov(a, b):  # Gorodkin: sum over classes of the column covariances
        return sum(np.cov(a[:, k], b[:, k])[0, 1] for k in range(4))

    expected = cov(x, y) / np.sqrt(cov(x, x) * cov(y, y))
    assert matthews_corrcoef(predictions, labels) == pytest.approx(expected, abs=1e-6)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)


def test_degenerate_cases_follow_sklearn():
    zeros = np.zeros(5, int)
    assert binary_f1(zeros, zeros) == 0.0
    assert matthews_corrcoef(zeros, np.array([0, 1, 0, 1, 1])) == 0.0
    assert np.isnan(pearson(np.ones(4), np.arange(4.0)))
    with pytest.raises(ValueError, match="must be equal 1-D"):
        accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no examples"):
        accuracy(np.zeros(0), np.zeros(0))


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, 300).astype(np.float64)  # many ties
    predictions = labels + rng.normal(0, 2, 300).round(0)  # ties too
    np.testing.assert_allclose(average_ranks(predictions), stats.rankdata(predictions))
    assert spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels).statistic, abs=1e-12)
    assert pearson(predictions, labels) == pytest.approx(
        stats.pearsonr(predictions, labels).statistic, abs=1e-12)
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_of_a_constant_input_is_nan_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(spearman(np.full(5, 0.3), np.arange(5.0)))


def test_metric_values_lie_in_their_ranges():
    """Every metric on random, perfect and inverted predictions stays in METRIC_RANGES (the
    ranges compare clips intervals to), and the ranges' ends are reached."""
    rng = np.random.default_rng(4)
    seen = {name: [] for name in ("accuracy", "f1", "mcc", "pearson", "spearman")}
    for trial in range(50):
        labels = rng.integers(0, 2, 40)
        predictions = [rng.integers(0, 2, 40), labels, 1 - labels][trial % 3]
        scores = [rng.normal(size=40), labels + 0.0, -labels + 0.0][trial % 3]
        seen["accuracy"].append(accuracy(predictions, labels))
        seen["f1"].append(binary_f1(predictions, labels))
        seen["mcc"].append(matthews_corrcoef(predictions, labels, 2))
        seen["pearson"].append(pearson(scores, labels))
        seen["spearman"].append(spearman(scores, labels))
    for name, values in seen.items():
        low, high = METRIC_RANGES[name]
        assert all(low - 1e-6 <= v <= high + 1e-6 for v in values), name
        assert min(values) == pytest.approx(low, abs=1e-6) and max(values) == pytest.approx(high, abs=1e-6), name
    assert set(METRIC_RANGES) >= {"token_accuracy", "loss"} and METRIC_RANGES["loss"] == (0.0, np.inf)


def test_jax_arrays_and_jit_agree_with_numpy():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 200)
    predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
    scores, targets = rng.normal(size=200), rng.normal(size=200)
    p, y = jnp.asarray(predictions), jnp.asarray(labels)
    assert float(jax.jit(accuracy)(p, y)) == pytest.approx(accuracy(predictions, labels), abs=1e-6)
    f1 = jax.jit(binary_f1)(p, y)
    assert float(f1) == pytest.approx(binary_f1(predictions, labels), abs=1e-6)
    mcc = jax.jit(matthews_corrcoef, static_argnums=2)(p, y, 3)
    assert float(mcc) == pytest.approx(matthews_corrcoef(predictions, labels), abs=1e-5)
    assert float(jax.jit(pearson)(jnp.asarray(scores), jnp.asarray(targets))) == pytest.approx(
        pearson(scores, targets), abs=1e-5)


def test_task_metrics_per_task():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [1.0, 0.0], [-1.0, 1.0]])  # argmax 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    assert task_metrics("sst2", logits, labels) == {"accuracy": 0.75}
    assert set(task_metrics("mrpc", logits, labels)) == {"accuracy", "f1"}
    assert task_metrics("qqp", logits, labels)["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    cola = task_metrics("cola", np.array([1, 0, 1, 0]), np.array([1, 0, 0, 0]))
    assert set(cola) == {"accuracy", "mcc"} and cola["mcc"] == pytest.approx(1 / np.sqrt(3))
    scores, targets = np.array([[0.1], [2.0], [3.5], [5.0]]), np.array([0.0, 2.5, 3.0, 4.8])
    stsb = task_metrics("stsb", scores, targets)
    assert set(stsb) == {"pearson", "spearman"} and stsb["spearman"] == pytest.approx(1.0)
    assert set(task_metrics("mnli", np.eye(3), np.arange(3))) == {"accuracy"}
    with pytest.raises(ValueError, match="unknown task 'sts'"):
        task_metrics("sts", logits, labels)


def test_gsm8k_accuracy():
    generations = [
        "3 + 4 = 7\n#### 7",
        "so the total is $1,080.",  # no ####: the last number counts
        "#### 18.0",
        "I do not know",
    ]
    references = ["#### 7", "1080", "x\n#### 18", "5"]
    assert gsm8k_accuracy(generations, references) == pytest.approx(3 / 4)
    assert task_metrics("gsm8k", generations[:1], ["8"]) == {"accuracy": 0.0}

"""Client partitioners: properties on the real SST-2 train labels and on synthetic labels."""

from pathlib import Path

import numpy as np
import pytest

from fedlora_jax.data.partition import (
    dirichlet,
    iid,
    imbalanced,
    label_histogram,
    label_proportions,
    partition,
    quantity,
    split_local_test,
)
from fedlora_jax.data.text import load_glue_local

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.usefixtures("shared_data")  # fails, never skips, when ../shared/data is absent


@pytest.fixture(scope="module")
def sst2_labels():
    labels = load_glue_local("sst2", DATA / "glue" / "SST-2", ["train"])["train"].labels
    assert np.bincount(labels).tolist() == [29780, 37569]
    return labels


@pytest.fixture(scope="module")
def synthetic_labels():
    return np.random.default_rng(7).integers(0, 5, size=3000)


def assert_disjoint_cover(parts, n, covering=True):
    for part in parts:
        assert part.dtype == np.int64
        assert (np.diff(part) > 0).all(), "indices must be sorted and unique"
        assert part.size > 0, "every client must be non-empty"
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size, "clients overlap"
    assert joined.min() >= 0 and joined.max() < n
    if covering:
        assert joined.size == n


SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.3, "min_size": 5}),
    ("quantity", {"sigma": 1.0, "min_size": 3}),
    ("imbalanced", {"dominant_fraction": 0.8}),
]


@needs_data
@pytest.mark.parametrize("scheme, options", SCHEMES)
def test_schemes_on_sst2(sst2_labels, scheme, options):
    parts = partition(sst2_labels, 12, scheme, seed=3, **options)
    assert len(parts) == 12
    assert_disjoint_cover(parts, sst2_labels.size, covering=scheme != "imbalanced")
    again = partition(sst2_labels, 12, scheme, seed=3, **options)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again)), "same seed, same split"
    other = partition(sst2_labels, 12, scheme, seed=4, **options)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other)), "seeds must differ"


@pytest.mark.parametrize("scheme, options", SCHEMES)
def test_schemes_on_synthetic(synthetic_labels, scheme, options):
    parts = partition(synthetic_labels, 7, scheme, seed=0, **options)
    assert_disjoint_cover(parts, synthetic_labels.size, covering=scheme != "imbalanced")
    assert label_histogram(synthetic_labels, parts, 5).sum() == sum(p.size for p in parts)


def test_iid_sizes_and_plain_count():
    parts = iid(10, 3, seed=0)
    assert sorted(p.size for p in parts) == [3, 3, 4]
    assert_disjoint_cover(parts, 10)


@needs_data
def test_dirichlet_large_alpha_is_near_iid(sst2_labels):
    parts = dirichlet(sst2_labels, 10, alpha=1e4, seed=0)
    counts = label_histogram(sst2_labels, parts, 2)
    fractions = counts[:, 1] / counts.sum(axis=1)
    assert np.abs(fractions - sst2_labels.mean()).max() < 0.02
    assert counts.sum(axis=1).min() > 0.8 * sst2_labels.size / 10


@needs_data
def test_dirichlet_small_alpha_is_skewed(sst2_labels):
    counts = label_histogram(sst2_labels, dirichlet(sst2_labels, 10, alpha=0.1, seed=0), 2)
    fractions = counts[:, 1] / counts.sum(axis=1)
    assert np.abs(fractions - sst2_labels.mean()).max() > 0.3
    assert (np.minimum(fractions, 1 - fractions) < 0.05).sum() >= 3  # near single-class clients


def test_dirichlet_min_size_is_met_by_repair():
    labels = np.repeat(np.arange(10), 30)  # 300 examples, 10 classes
    parts = dirichlet(labels, 50, alpha=0.01, seed=1, min_size=5, max_retries=2)
    assert min(p.size for p in parts) >= 5
    assert_disjoint_cover(parts, 300)


def test_impossible_requests_raise():
    with pytest.raises(ValueError, match="cannot give 11 clients at least 1 example"):
        iid(10, 11, seed=0)
    with pytest.raises(ValueError, match="cannot give 5 clients at least 3"):
        dirichlet(np.zeros(12, int), 5, 1.0, seed=0, min_size=3)
    with pytest.raises(ValueError, match="cannot give"):
        quantity(4, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="needs integer class labels"):
        dirichlet(np.linspace(0, 5, 20), 2, 1.0, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet(np.zeros(20, int), 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="only 2 exist"):
        label_proportions(np.array([0, 0, 1, 1, 1, 1]), [[1.0, 0.0]], seed=0, sizes=[3])
    with pytest.raises(ValueError, match="sum to 1"):
        label_proportions(np.array([0, 1]), [[0.5, 0.6]], seed=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        imbalanced(np.zeros(10, int), 2, seed=0)


@needs_data
def test_label_proportions_ffa_lora_split(sst2_labels):
    proportions = np.array([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])
    parts = label_proportions(sst2_labels, proportions, seed=0)
    assert_disjoint_cover(parts, sst2_labels.size, covering=False)
    counts = label_histogram(sst2_labels, parts, 2)
    sizes = counts.sum(axis=1)
    assert len(set(sizes.tolist())) == 1, "equal client sizes by default"
    np.testing.assert_allclose(counts / sizes[:, None], proportions, atol=0.01)
    # The largest equal size: class 0 (29,780 examples) is used up to within rounding.
    assert counts[:, 0].sum() > 29780 - 3
    explicit = label_proportions(sst2_labels, proportions, seed=0, sizes=[100, 200, 300])
    assert [p.size for p in explicit] == [100, 200, 300]
    np.testing.assert_allclose(
        label_histogram(sst2_labels, explicit, 2) / np.array([[100], [200], [300]]),
        proportions, atol=0.01)


@needs_data
def test_imbalanced_dominant_classes(sst2_labels):
    parts = imbalanced(sst2_labels, 4, dominant_fraction=0.9, seed=0)
    counts = label_histogram(sst2_labels, parts, 2)
    fractions = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.diag(fractions[:, [0, 1, 0, 1]]), 0.9, atol=0.01)


def test_quantity_skew_grows_with_sigma():
    flat = [p.size for p in quantity(10_000, 20, 0.0, seed=0)]
    skewed = [p.size for p in quantity(10_000, 20, 2.0, seed=0, min_size=10)]
    assert max(flat) - min(flat) < 150
    assert max(skewed) > 5 * min(skewed) and min(skewed) >= 10
    assert sum(skewed) == 10_000


def test_split_local_test():
    parts = iid(1000, 5, seed=0) + [np.array([5000])]
    train, test = split_local_test(parts, 0.2, seed=1)
    for part, tr, te in zip(parts, train, test):
        assert np.array_equal(np.union1d(tr, te), part) and np.intersect1d(tr, te).size == 0
        assert (np.diff(tr) > 0).all() and (np.diff(te) > 0).all()
    assert [t.size for t in test[:5]] == [40] * 5
    assert train[5].tolist() == [5000] and test[5].size == 0  # a lone example stays in train
    again = split_local_test(parts, 0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(test, again[1]))
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        split_local_test(parts, 1.0, seed=0)


def test_dispatcher_errors(synthetic_labels):
    with pytest.raises(ValueError, match="unknown partition scheme 'dirichlett'"):
        partition(synthetic_labels, 3, "dirichlett", seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        partition(synthetic_labels, 3, "iid", seed=0, alpha=1.0)
    with pytest.raises(ValueError, match="needs option"):
        partition(synthetic_labels, 3, "dirichlet", seed=0)
    with pytest.raises(ValueError, match="proportions has 2 rows"):
        partition(synthetic_labels, 3, "label_proportions", seed=0,
                  proportions=np.full((2, 5), 0.2))
    parts = partition(synthetic_labels, 2, "label_proportions", seed=0,
                      proportions=np.full((2, 5), 0.2))
    assert len(parts) == 2 and parts[0].size == parts[1].size


def test_label_histogram():
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram(labels, [np.array([0])], 2)


def test_label_heatmap_png(tmp_path, synthetic_labels):
    from matplotlib.image import imread

    from fedlora_jax.analysis.plots import plot_label_heatmap

    counts = label_histogram(synthetic_labels, dirichlet(synthetic_labels, 6, 0.5, seed=0), 5)
    path = plot_label_heatmap(counts, tmp_path / "plots" / "labels.png",
                              class_names=list("abcde"), title="Dirichlet 0.5")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.1  # not a blank canvas
    with pytest.raises(ValueError, match="non-empty"):
        plot_label_heatmap(np.zeros((0, 2)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="3 class names for 5 classes"):
        plot_label_heatmap(counts, tmp_path / "x.png", class_names=["a", "b", "c"])

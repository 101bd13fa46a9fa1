"""Seeded partitions of a data set's examples into federated clients.

Every partitioner is a pure function of its arguments: the same seed gives the same split
(``np.random.default_rng(seed)``). Each returns a list of U int64 index arrays, one per client,
each sorted. The arrays are disjoint; they cover all examples except for
:func:`label_proportions` and :func:`imbalanced`, which leave out the examples their target class
mixture cannot use. Labels are [N] integer class ids ``0..C-1`` for label-aware schemes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np


def _class_labels(labels: Any, scheme: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{scheme}: labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{scheme}: needs integer class labels, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{scheme}: class labels must be >= 0, got {labels.min()}")
    return labels.astype(np.int64)


def _num_examples(n_or_labels: int | Any) -> int:
    if isinstance(n_or_labels, (int, np.integer)):
        return int(n_or_labels)
    return int(np.asarray(n_or_labels).shape[0])


def _check_clients(n: int, num_clients: int, min_size: int, scheme: str) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"{scheme}: num_clients must be a positive integer, got {num_clients!r}")
    if min_size < 1:
        raise ValueError(f"{scheme}: min_size must be >= 1, got {min_size}")
    if num_clients * min_size > n:
        raise ValueError(
            f"{scheme}: cannot give {num_clients} clients at least {min_size} example(s) "
            f"each from {n} examples"
        )


def _sorted_parts(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n_or_labels: int | Any, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffles the examples and splits them into U near-equal parts (sizes differ by <= 1).

    Args:
      n_or_labels: N, or an [N] array (only its length is used).
      num_clients: U.
      seed: random seed.

    Returns:
      U sorted int64 index arrays covering ``0..N-1``.
    """
    n = _num_examples(n_or_labels)
    _check_clients(n, num_clients, 1, "iid")
    order = np.random.default_rng(seed).permutation(n)
    return _sorted_parts(np.array_split(order, num_clients))


def dirichlet(
    labels: Any,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by proportions ~ Dirichlet(alpha).

    Small alpha gives each client few classes; alpha -> infinity approaches an iid split. The
    draw is repeated (up to ``max_retries`` times) until every client holds at least
    ``min_size`` examples; if no draw achieves that, the last one is repaired by moving random
    examples from the largest clients to the ones short of ``min_size``.

    Args:
      labels: [N] integer class ids.
      num_clients: U.
      alpha: Dirichlet concentration (> 0).
      seed: random seed.
      min_size: the fewest examples a client may hold (>= 1).
      max_retries: number of fresh draws before repairing.

    Returns:
      U sorted int64 index arrays covering ``0..N-1``.
    """
    labels = _class_labels(labels, "dirichlet")
    _check_clients(labels.size, num_clients, min_size, "dirichlet")
    if not alpha > 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    for _ in range(max(1, max_retries)):
        parts = [[] for _ in range(num_clients)]
        for members in by_class:
            if members.size == 0:
                continue
            proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for client, chunk in enumerate(np.split(rng.permutation(members), cuts)):
                parts[client].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(p.size for p in parts) >= min_size:
            return _sorted_parts(parts)
    return _sorted_parts(_repair_min_size(parts, min_size, rng))


def _repair_min_size(
    parts: list[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Moves random examples from the largest clients until every client has min_size."""
    parts = [rng.permutation(p) for p in parts]
    for needy in range(len(parts)):
        while parts[needy].size < min_size:
            donor = int(np.argmax([p.size for p in parts]))
            take = min(min_size - parts[needy].size, parts[donor].size - min_size)
            parts[needy] = np.concatenate([parts[needy], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to total, as close as possible to total * weights."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def label_proportions(
    labels: Any,
    proportions: Any,
    seed: int,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Gives client u a class mixture ``proportions[u]`` (FFA-LoRA's label-skewed splits).

    E.g. ``[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]`` makes three clients with 10%, 90% and 50% of
    class 0. Client u receives ``round(sizes[u] * proportions[u, c])`` random examples of class c
    (largest-remainder rounding, so each client holds exactly ``sizes[u]``). Examples a mixture
    does not need are left unassigned.

    Args:
      labels: [N] integer class ids in ``0..C-1``.
      proportions: [U, C] non-negative rows summing to 1.
      seed: random seed.
      sizes: [U] client sizes; None gives every client the same, largest size the class counts
        allow.

    Returns:
      U sorted, disjoint int64 index arrays.
    """
    labels = _class_labels(labels, "label_proportions")
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 2 or proportions.shape[0] < 1:
        raise ValueError(f"label_proportions: proportions must be [U, C], got {proportions.shape}")
    num_clients, num_classes = proportions.shape
    if labels.size and labels.max() >= num_classes:
        raise ValueError(
            f"label_proportions: label {labels.max()} but proportions have {num_classes} classes"
        )
    if (proportions < 0).any() or not np.allclose(proportions.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("label_proportions: each row of proportions must be >= 0 and sum to 1")
    available = np.bincount(labels, minlength=num_classes)
    if sizes is None:
        demand = proportions.sum(axis=0)
        size = int(np.min(available[demand > 0] / demand[demand > 0]))
        # Rounding can ask for one example more than a class holds; shrink until it fits.
        while size > 0 and (
            _class_counts(proportions, [size] * num_clients).sum(axis=0) > available
        ).any():
            size -= 1
        if size == 0:
            raise ValueError("label_proportions: too few examples of a class for these proportions")
        sizes = [size] * num_clients
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.shape != (num_clients,) or (sizes < 1).any():
        raise ValueError(f"label_proportions: need {num_clients} client sizes >= 1, got {sizes}")
    counts = _class_counts(proportions, sizes)
    short = np.flatnonzero(counts.sum(axis=0) > available)
    if short.size:
        c = int(short[0])
        raise ValueError(
            f"label_proportions: clients need {counts[:, c].sum()} examples of class {c}, "
            f"only {available[c]} exist"
        )
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in enumerate(np.split(members, np.cumsum(counts[:, c]))[:num_clients]):
            parts[client].append(chunk)
    return _sorted_parts([np.concatenate(p) for p in parts])


def _class_counts(proportions: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """[U, C] example counts: row u splits sizes[u] by proportions[u]."""
    return np.stack([_largest_remainder(int(s), row) for s, row in zip(sizes, proportions)])


def imbalanced(
    labels: Any,
    num_clients: int,
    dominant_fraction: float = 0.9,
    *,
    seed: int,
    sizes: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Each client is dominated by one class (client u by class ``u mod C``), as in FRA-LoRA.

    Client u draws ``dominant_fraction`` of its examples from its dominant class and the rest
    evenly from the other classes; built on :func:`label_proportions` (unused examples are left
    out; by default all clients have the same, largest feasible size).

    Args:
      labels: [N] integer class ids, at least 2 classes.
      num_clients: U.
      dominant_fraction: share of the dominant class in each client, in [0, 1].
      seed: random seed.
      sizes: [U] client sizes, or None.

    Returns:
      U sorted, disjoint int64 index arrays.
    """
    labels = _class_labels(labels, "imbalanced")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if num_classes < 2:
        raise ValueError(f"imbalanced: needs at least 2 classes, got {num_classes}")
    if not 0.0 <= dominant_fraction <= 1.0:
        raise ValueError(
            f"imbalanced: dominant_fraction must be in [0, 1], got {dominant_fraction}"
        )
    _check_clients(labels.size, num_clients, 1, "imbalanced")
    proportions = np.full((num_clients, num_classes), (1 - dominant_fraction) / (num_classes - 1))
    proportions[np.arange(num_clients), np.arange(num_clients) % num_classes] = dominant_fraction
    return label_proportions(labels, proportions, seed, sizes)


def quantity(
    n_or_labels: int | Any, num_clients: int, sigma: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: client sizes follow a log-normal(0, sigma) law; examples are random.

    Every client first gets ``min_size`` examples; the rest are shared out by multinomial draws
    with the log-normal weights. ``sigma = 0`` gives near-equal sizes.

    Args:
      n_or_labels: N, or an [N] array (only its length is used).
      num_clients: U.
      sigma: log-normal standard deviation (>= 0).
      seed: random seed.
      min_size: the fewest examples a client may hold (>= 1).

    Returns:
      U sorted int64 index arrays covering ``0..N-1``.
    """
    n = _num_examples(n_or_labels)
    _check_clients(n, num_clients, min_size, "quantity")
    if sigma < 0:
        raise ValueError(f"quantity: sigma must be >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, size=num_clients)
    sizes = min_size + rng.multinomial(n - num_clients * min_size, weights / weights.sum())
    order = rng.permutation(n)
    return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


def split_local_test(
    parts: Sequence[np.ndarray], test_fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Splits every client's examples into a local train and a local test set.

    Client u keeps ``round(test_fraction * n_u)`` random examples for testing, but never all of
    them: a non-empty client keeps at least one training example.

    Args:
      parts: U index arrays (a partition).
      test_fraction: share of each client's examples held out, in [0, 1).
      seed: random seed.

    Returns:
      (train_parts, test_parts): two lists of U sorted int64 index arrays.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for part in parts:
        shuffled = rng.permutation(np.asarray(part, dtype=np.int64))
        n_test = min(int(round(test_fraction * shuffled.size)), max(shuffled.size - 1, 0))
        test.append(shuffled[:n_test])
        train.append(shuffled[n_test:])
    return _sorted_parts(train), _sorted_parts(test)


SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "label_proportions": label_proportions,
    "imbalanced": imbalanced,
    "quantity": quantity,
}


def partition(
    labels: Any, num_clients: int, scheme: str, seed: int, **options: Any
) -> list[np.ndarray]:
    """Partitions examples into clients with the scheme named in a config.

    Args:
      labels: [N] labels (integer class ids for label-aware schemes; any [N] array for ``iid``
        and ``quantity``).
      num_clients: U (for ``label_proportions``, must equal the rows of ``proportions``).
      scheme: ``iid``, ``dirichlet``, ``label_proportions``, ``imbalanced`` or ``quantity``.
      seed: random seed.
      **options: the scheme's own arguments (``alpha``, ``min_size``, ``proportions``,
        ``sizes``, ``dominant_fraction``, ``sigma``, ...).

    Returns:
      U sorted int64 index arrays (see the scheme).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    function = SCHEMES[scheme]
    accepted = set(inspect.signature(function).parameters) - {
        "labels", "n_or_labels", "num_clients", "seed"
    }
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"partition scheme {scheme!r}: unknown option(s) {', '.join(sorted(unknown))} "
            f"(accepted: {', '.join(sorted(accepted))})"
        )
    if scheme == "label_proportions":
        if "proportions" not in options:
            raise ValueError("partition scheme 'label_proportions' needs option 'proportions'")
        rows = np.asarray(options["proportions"]).shape[0]
        if rows != num_clients:
            raise ValueError(f"num_clients is {num_clients} but proportions has {rows} rows")
        return function(labels, seed=seed, **options)
    required = [
        p.name for p in inspect.signature(function).parameters.values()
        if p.default is inspect.Parameter.empty and p.name in accepted and p.name not in options
    ]
    if required:
        raise ValueError(f"partition scheme {scheme!r} needs option(s) {', '.join(required)}")
    return function(labels, num_clients, seed=seed, **options)


def label_histogram(labels: Any, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts each client's examples per class.

    Args:
      labels: [N] integer class ids.
      parts: U index arrays.
      num_classes: C.

    Returns:
      [U, C] int64 counts.
    """
    labels = _class_labels(labels, "label_histogram")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label_histogram: label {labels.max()} >= num_classes {num_classes}")
    counts = [np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)
              for p in parts]
    return np.stack(counts).astype(np.int64) if counts else np.zeros((0, num_classes), np.int64)

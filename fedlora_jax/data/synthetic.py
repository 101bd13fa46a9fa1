"""An offline sequence-classification task with planted patterns and per-client label skew.

Token ids: 0 pad, 1 [CLS], 2 [SEP]; the content ids 3..V-1 are split into one small group of
"signal" tokens per class and a pool of noise tokens. An example of class c is
[CLS] + noise with ``signal_tokens`` tokens of group c planted at random positions + [SEP],
with a random length (so batches carry padding). Client u draws its label prior from
Dirichlet(alpha) and its size uniformly from ``examples_per_client``; its local test split
follows the same prior, while the global test set is class-balanced.
"""

from __future__ import annotations

import numpy as np

from fedlora_jax.data.base import FederatedData, federate

PAD, CLS, SEP = 0, 1, 2
FIRST_CONTENT = 3


def _make_examples(rng: np.random.Generator, labels: np.ndarray, vocab_size: int, seq_len: int,
                   num_labels: int, signal_tokens: int) -> dict[str, np.ndarray]:
    """Token sequences [N, seq_len] for the given labels [N]."""
    group = max(2, (vocab_size - FIRST_CONTENT) // (4 * num_labels))
    noise_start = FIRST_CONTENT + group * num_labels
    n = len(labels)
    lengths = rng.integers(max(signal_tokens + 2, seq_len // 2), seq_len + 1, size=n)
    ids = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, (label, length) in enumerate(zip(labels, lengths)):
        body = rng.integers(noise_start, vocab_size, size=length - 2)
        spots = rng.choice(length - 2, size=signal_tokens, replace=False)
        body[spots] = FIRST_CONTENT + label * group + rng.integers(0, group, size=signal_tokens)
        ids[i, :length] = np.concatenate([[CLS], body, [SEP]])
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}


def make_synthetic(
    num_clients: int,
    examples_per_client: tuple[int, int] = (64, 128),
    vocab_size: int = 128,
    seq_len: int = 16,
    num_labels: int = 2,
    label_skew_alpha: float = 0.5,
    signal_tokens: int = 3,
    test_examples: int = 512,
    local_test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedData:
    """Generates the synthetic federated task (deterministic in ``seed``)."""
    group = (vocab_size - FIRST_CONTENT) // (4 * num_labels)
    if group < 2:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for {num_labels} labels "
            f"(need >= {FIRST_CONTENT + 8 * num_labels + 1})"
        )
    if seq_len < signal_tokens + 2:
        raise ValueError(f"seq_len {seq_len} must be >= signal_tokens + 2 = {signal_tokens + 2}")
    rng = np.random.default_rng(seed)
    lo, hi = examples_per_client
    sizes = rng.integers(lo, hi + 1, size=num_clients)
    priors = rng.dirichlet(np.full(num_labels, label_skew_alpha), size=num_clients)
    labels = np.concatenate([rng.choice(num_labels, size=s, p=p) for s, p in zip(sizes, priors)])
    pool = _make_examples(rng, labels, vocab_size, seq_len, num_labels, signal_tokens)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    train_idx, test_idx = [], []
    for u in range(num_clients):
        idx = np.arange(bounds[u], bounds[u + 1])
        n_test = int(round(local_test_fraction * len(idx)))
        n_test = min(n_test, len(idx) - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    test_labels = np.arange(test_examples) % num_labels
    global_test = _make_examples(rng, test_labels, vocab_size, seq_len, num_labels, signal_tokens)
    return federate(pool, train_idx, test_idx, global_test, "classification", num_labels, name="synthetic",
                    label_names=[f"class {c}" for c in range(num_labels)])

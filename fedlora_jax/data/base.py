"""Host-side data containers: a task's examples, and the same split into clients (rows stored
once, client after client).

Arrays are dicts of numpy arrays with a leading example axis: ``input_ids`` [N, L] int32,
``attention_mask`` [N, L] int32, optional ``token_type_ids`` [N, L], ``labels`` [N] (int class,
or float for regression) or [N, L] for causal LM with ``loss_mask`` [N, L].
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

TASK_KINDS = ("classification", "regression", "causal_lm")

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class GenerationTask:
    """Prompts of the global test set for generation-based scoring (GSM8K exact match).

    prompts: N prompt texts; references: N final answers ("72"); tokenizer: its directory,
    tokenizer.json or hub id; eos_token: the token that ends an answer, or None.
    """

    prompts: Sequence[str]
    references: Sequence[str]
    tokenizer: str
    eos_token: str | None = None


def offsets_of(counts) -> np.ndarray:
    """First row of each client when clients' rows are stored one after another: [U] int64."""
    counts = np.asarray(counts, np.int64)
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts.size else counts


@dataclasses.dataclass
class FederatedData:
    """Client examples stored once, without per-client padding, plus a global test set.

    Each client's rows are contiguous, clients one after another: client u's training rows are
    ``train[k][train_offsets[u] : train_offsets[u] + num_train[u]]``. Memory follows the data,
    not the largest client.

    Attributes:
      train: every client's training rows, arrays [N_train, ...] (N_train = sum of num_train).
      num_train: [U] training examples per client (each >= 1).
      local_test: every client's local test rows, arrays [N_local, ...].
      num_local_test: [U].
      global_test: the global test set [N_test, ...].
      task: one of TASK_KINDS.
      num_labels: classes (1 for regression).
      name: a short task name used for metric selection (e.g. "sst2", "synthetic").
      label_names: optional class names, for plots and reports.
      generation: the global test set's prompts for generation-based scoring (causal LM), or None.
    """

    train: Arrays
    num_train: np.ndarray
    local_test: Arrays
    num_local_test: np.ndarray
    global_test: Arrays
    task: str
    num_labels: int
    name: str = "task"
    label_names: Sequence[str] | None = None
    generation: GenerationTask | None = None

    def __post_init__(self):
        for what, arrays, counts in (("train", self.train, self.num_train),
                                     ("local_test", self.local_test, self.num_local_test)):
            rows = {len(v) for v in arrays.values()}
            if rows and rows != {int(np.sum(counts))}:
                raise ValueError(
                    f"FederatedData.{what}: arrays hold {sorted(rows)} rows but the clients' counts sum to "
                    f"{int(np.sum(counts))} (rows are stored once, client after client)"
                )

    @property
    def num_clients(self) -> int:
        return int(self.num_train.shape[0])

    @property
    def train_offsets(self) -> np.ndarray:
        return offsets_of(self.num_train)

    @property
    def local_test_offsets(self) -> np.ndarray:
        return offsets_of(self.num_local_test)

    def client_train(self, u: int) -> Arrays:
        """Client u's training rows (views)."""
        start = int(self.train_offsets[u])
        return {k: v[start: start + int(self.num_train[u])] for k, v in self.train.items()}

    def client_local_test(self, u: int) -> Arrays:
        """Client u's local test rows (views)."""
        start = int(self.local_test_offsets[u])
        return {k: v[start: start + int(self.num_local_test[u])] for k, v in self.local_test.items()}

    def client_labels(self) -> list[np.ndarray]:
        """Each client's training labels (classification only)."""
        return [self.client_train(u)["labels"] for u in range(self.num_clients)]


def _concat_rows(arrays: Arrays, parts: Sequence[np.ndarray]) -> tuple[Arrays, np.ndarray]:
    """``arrays`` rows of each index array, client after client: ([sum of sizes, ...], sizes [U])."""
    sizes = np.array([len(p) for p in parts], dtype=np.int32)
    order = np.concatenate([np.asarray(p, np.int64) for p in parts]) if len(parts) else np.zeros(0, np.int64)
    return {name: values[order] for name, values in arrays.items()}, sizes


def federate(
    train: Arrays,
    client_train_indices: Sequence[np.ndarray],
    client_test_indices: Sequence[np.ndarray],
    global_test: Arrays,
    task: str,
    num_labels: int,
    name: str = "task",
    label_names: Sequence[str] | None = None,
) -> FederatedData:
    """Builds the clients' rows (stored once, client after client) from per-client index arrays
    into ``train``."""
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, got {task!r}")
    empty = [u for u, idx in enumerate(client_train_indices) if len(idx) == 0]
    if empty:
        raise ValueError(f"clients {empty} have no training examples")
    rows, num_train = _concat_rows(train, client_train_indices)
    local, num_local = _concat_rows(train, client_test_indices)
    return FederatedData(rows, num_train, local, num_local, global_test, task, num_labels, name, label_names)

"""Host-side data containers: a task's examples, and the same split into padded client shards.

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


@dataclasses.dataclass
class FederatedData:
    """Client shards padded to static shapes, plus a global test set.

    Attributes:
      train: client training shards, each array [U, n_max, ...]; rows >= num_train[u] are padding.
      num_train: [U] real training examples per client.
      local_test: client test shards [U, m_max, ...]; rows >= num_local_test[u] are padding.
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

    @property
    def num_clients(self) -> int:
        return int(self.num_train.shape[0])

    def client_labels(self) -> list[np.ndarray]:
        """Each client's real training labels (classification only)."""
        return [self.train["labels"][u, : int(n)] for u, n in enumerate(self.num_train)]


def _pad_stack(arrays: Arrays, parts: Sequence[np.ndarray]) -> tuple[Arrays, np.ndarray]:
    """Gathers ``arrays[idx]`` for each index array and zero-pads to [U, max_len, ...]."""
    sizes = np.array([len(p) for p in parts], dtype=np.int32)
    width = max(int(sizes.max(initial=0)), 1)
    out = {}
    for name, values in arrays.items():
        stacked = np.zeros((len(parts), width) + values.shape[1:], dtype=values.dtype)
        for u, idx in enumerate(parts):
            stacked[u, : len(idx)] = values[idx]
        out[name] = stacked
    return out, sizes


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
    """Builds padded client shards from per-client index arrays into ``train``."""
    if task not in TASK_KINDS:
        raise ValueError(f"task must be one of {TASK_KINDS}, got {task!r}")
    empty = [u for u, idx in enumerate(client_train_indices) if len(idx) == 0]
    if empty:
        raise ValueError(f"clients {empty} have no training examples")
    shards, num_train = _pad_stack(train, client_train_indices)
    local, num_local = _pad_stack(train, client_test_indices)
    return FederatedData(shards, num_train, local, num_local, global_test, task, num_labels, name, label_names)

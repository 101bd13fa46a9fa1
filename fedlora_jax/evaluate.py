"""Jitted evaluation: the global model on the global test set, and each cohort client's
personalised model (after its local training) on its own local test split.

Predictions and per-example losses come back to the host, where task metrics are computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedlora_jax import metrics as task_metrics_lib
from fedlora_jax.tasks import forward, per_example_loss, predictions


def pad_rows(arrays: dict, multiple: int, axis: int = 0) -> dict:
    """Zero-pads every array along ``axis`` to a multiple of ``multiple`` rows."""
    n = next(iter(arrays.values())).shape[axis]
    extra = (-n) % multiple
    if not extra:
        return dict(arrays)
    out = {}
    for k, v in arrays.items():
        widths = [(0, 0)] * v.ndim
        widths[axis] = (0, extra)
        out[k] = np.pad(v, widths)
    return out


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Batched prediction with static shapes; rows are padded to ``batch_size`` multiples."""

    graphdef: Any
    task: str
    batch_size: int

    def predict(self, params, frozen, arrays: dict):
        """Predictions and per-example losses for arrays [N, ...] with N a multiple of batch_size."""
        n = jax.tree.leaves(arrays)[0].shape[0]
        batches = jax.tree.map(lambda x: x.reshape((n // self.batch_size, self.batch_size) + x.shape[1:]), arrays)
        model = nnx.merge(self.graphdef, params, frozen)

        def one(batch):
            logits = forward(model, batch)
            return predictions(logits, self.task), per_example_loss(logits, batch, self.task)

        preds, losses = jax.lax.map(one, batches)
        return preds.reshape((n,) + preds.shape[2:]), losses.reshape(n)

    def compile(self):
        """(global_fn, local_fn): jitted predict, and predict vmapped over client states and shards."""
        global_fn = jax.jit(self.predict)
        local_fn = jax.jit(jax.vmap(self.predict, in_axes=(0, None, 0)))
        return global_fn, local_fn


def score(task_name: str, task: str, preds: np.ndarray, losses: np.ndarray, arrays: dict, valid: np.ndarray) -> dict:
    """Task metrics plus mean loss over the valid rows (``valid`` [N] bool)."""
    out = {"loss": float(np.mean(losses[valid]))}
    if task == "causal_lm":
        targets = arrays["input_ids"][:, 1:]
        scored = arrays.get("loss_mask", arrays["attention_mask"])[:, 1:].astype(bool) & valid[:, None]
        out["token_accuracy"] = float(np.mean(preds[scored] == targets[scored]))
        return out
    preds, labels = preds[valid], arrays["labels"][valid]
    if task_name in task_metrics_lib.GLUE_TASKS:
        out.update(task_metrics_lib.task_metrics(task_name, preds, labels))
    elif task == "regression":
        out.update(pearson=task_metrics_lib.pearson(preds, labels), spearman=task_metrics_lib.spearman(preds, labels))
    else:
        out["accuracy"] = task_metrics_lib.accuracy(preds, labels)
    return out


def weighted_client_metrics(per_client: list[dict], sizes: np.ndarray) -> dict:
    """Example-weighted means of per-client metric dicts (clients with no test rows skipped)."""
    keep = [i for i, n in enumerate(sizes) if n > 0]
    if not keep:
        return {}
    w = sizes[keep] / sizes[keep].sum()
    return {k: float(sum(w[j] * per_client[i][k] for j, i in enumerate(keep))) for k in per_client[keep[0]]}

"""Jitted evaluation: the global model on the global test set, and each cohort client's
personalised model (after its local training) on its own local test split.

Predictions and per-example losses come back to the host, where task metrics are computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from fedlora_jax.eval import metrics as task_metrics_lib
from fedlora_jax.data.packing import pack_examples, pack_groups
from fedlora_jax.engine import sharding
from fedlora_jax.tasks import forward, per_example_loss, predictions


def pad_rows(tree, multiple: int, axis: int = 0):
    """Zero-pads every array leaf of ``tree`` (a dict of rows, or batches holding a
    :class:`~fedlora_jax.data.packing.Packing`) along ``axis`` to a multiple of ``multiple``.

    Zero rows are empty everywhere: a padded row's mask is 0 and a packed stream's zero
    ``segment_ids`` and ``lengths`` mark unused tokens and empty slots."""
    n = jax.tree.leaves(tree)[0].shape[axis]
    extra = (-n) % multiple

    def pad(v):
        widths = [(0, 0)] * np.ndim(v)
        widths[axis] = (0, extra)
        return np.pad(np.asarray(v), widths)

    return jax.tree.map(pad, tree)


def eval_batches(arrays: dict, batch_size: int, num_tokens: int | None = None) -> tuple[dict, np.ndarray]:
    """Static-shape evaluation batches of a test set (host-side).

    Padded (``num_tokens`` None): rows in batches [nb, batch_size, ...]. Packed: streams of
    ``num_tokens`` tokens holding up to ``batch_size`` examples each (see
    :func:`fedlora_jax.data.packing.pack_examples`).

    Returns:
      (batches with a leading [nb] axis, index [nb, batch_size] of each slot's row, -1 when empty).
    """
    if num_tokens is not None:
        return pack_examples(arrays, batch_size, num_tokens)
    n = len(next(iter(arrays.values())))
    padded = pad_rows(arrays, batch_size)
    nb = max(len(next(iter(padded.values()))) // batch_size, 0)
    index = np.arange(nb * batch_size).reshape(nb, batch_size)
    batches = {k: v.reshape((nb, batch_size) + v.shape[1:]) for k, v in padded.items()}
    return batches, np.where(index < n, index, -1)


def eval_batch_count(attention_mask: np.ndarray, batch_size: int, num_tokens: int | None = None) -> int:
    """How many batches :func:`eval_batches` makes of rows with this mask (host-side, nothing built)."""
    if num_tokens is not None:
        return int(pack_groups(attention_mask, batch_size, num_tokens).shape[0])
    return -(-len(attention_mask) // batch_size)


def client_rows(arrays: dict, offsets: np.ndarray, sizes: np.ndarray, u: int) -> dict:
    """Client u's rows of arrays stored client after client (one zero row for a client without rows)."""
    start, n = int(offsets[u]), int(sizes[u])
    if n == 0:
        return {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in arrays.items()}
    return {k: v[start: start + n] for k, v in arrays.items()}


def client_eval_batches(arrays: dict, offsets: np.ndarray, sizes: np.ndarray, clients, batch_size: int,
                        num_tokens: int | None = None, num_batches: int | None = None, cache: dict | None = None):
    """:func:`eval_batches` of each of ``clients``' rows (arrays [M, ...] stored client after
    client, ``offsets`` / ``sizes`` [U]), stacked to [K, nb, ...] (clients with fewer batches get
    empty ones; ``num_batches`` fixes nb, default the most any of them needs); index
    [K, nb, batch_size] (-1: empty slot). ``cache`` (client id -> its batches) keeps each client's
    batches for later calls."""
    cache = {} if cache is None else cache
    for u in clients:
        if int(u) not in cache:
            cache[int(u)] = eval_batches(client_rows(arrays, offsets, sizes, u), batch_size, num_tokens)
    per_client = [cache[int(u)] for u in clients]
    nb = max(index.shape[0] for _, index in per_client) if num_batches is None else num_batches

    def grow(x, fill):
        return np.concatenate([x, np.full((nb - x.shape[0],) + x.shape[1:], fill, x.dtype)]) if x.shape[0] < nb else x

    batches = jax.tree.map(lambda *xs: np.stack([grow(np.asarray(x), 0) for x in xs]), *[b for b, _ in per_client])
    index = np.stack([grow(i, -1) for _, i in per_client])
    index = np.where(index < np.asarray(sizes)[np.asarray(clients)][:, None, None], index, -1)
    return batches, index


def unbatch(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Per-slot values [nb, E, ...] back to per-row values [n, ...] (rows in ``index`` order)."""
    out = np.zeros((n,) + values.shape[2:], values.dtype)
    keep = index >= 0
    out[index[keep]] = values[keep]
    return out


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """Jitted prediction over static-shape batches (:func:`eval_batches`).

    ``num_tokens`` / ``local_num_tokens``: stream lengths of packed global / local test batches
    (None: padded rows).
    """

    graphdef: Any
    task: str
    batch_size: int
    num_tokens: int | None = None
    local_num_tokens: int | None = None

    def predict(self, params, frozen, batches: dict):
        """Predictions [nb, E, ...] and per-example losses [nb, E] of batches with a leading [nb] axis."""
        model = nnx.merge(self.graphdef, params, frozen)

        def one(batch):
            logits = forward(model, batch)
            return predictions(logits, self.task), per_example_loss(logits, batch, self.task)

        return jax.lax.map(one, batches)

    def compile(self, mesh: jax.sharding.Mesh | None = None):
        """(global_fn, local_fn): jitted predict, and predict vmapped over client states and batches.

        On a ``mesh`` of several devices each client group (the ``clients`` axis) predicts its share
        of the batch axis (global batches [nb, ...], local batches [K, nb, ...]; nb must divide by
        the group count), with the states replicated (the frozen base split over ``model``); the
        outputs are gathered to every device, so every process of a multi-process run can read
        them."""
        local = jax.vmap(self.predict, in_axes=(0, None, 0))
        if mesh is None or mesh.size == 1:
            return jax.jit(self.predict), jax.jit(local)
        spec = jax.sharding.PartitionSpec
        # over a ``model`` axis the frozen base stays split: the map is manual over ``clients`` only
        axes = ("clients",)
        global_fn = jax.shard_map(self.predict, mesh=mesh, in_specs=(spec(), spec(), spec(axes)),
                                  out_specs=spec(axes), axis_names=set(axes))
        local_fn = jax.shard_map(local, mesh=mesh, in_specs=(spec(), spec(), spec(None, axes)),
                                 out_specs=spec(None, axes), axis_names=set(axes))
        everywhere = sharding.everywhere(mesh)
        return jax.jit(global_fn, out_shardings=everywhere), jax.jit(local_fn, out_shardings=everywhere)


def score(task_name: str, task: str, preds: np.ndarray, losses: np.ndarray, arrays: dict, valid: np.ndarray) -> dict:
    """Task metrics plus mean loss over the valid rows (``valid`` [N] bool).

    Causal LM: ``preds`` [N, L-1] are the outputs at positions 0 .. L-2, scored against tokens
    1 .. L-1 where ``loss_mask[:, 1:]`` (default the attention mask) is 1, the target-token
    convention of :mod:`fedlora_jax.tasks`; ``token_accuracy`` pools those tokens over the valid
    rows, while ``loss`` is the mean of the per-example losses.
    """
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

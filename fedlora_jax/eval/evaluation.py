"""A run's evaluation between rounds: the global model on the global test set (and generation),
each cohort client's trained model on its own local test rows."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax.data.base import FederatedData, offsets_of
from fedlora_jax.engine.sharding import client_groups
from fedlora_jax.eval.evaluate import (Evaluator, client_eval_batches, client_rows, eval_batch_count, eval_batches,
                                       pad_rows, score, unbatch, weighted_client_metrics)
from fedlora_jax.eval.generate import gsm8k_exact_match


class Evaluation:
    """Host-side wrapper of the jitted evaluators with the test batches prepared once.

    ``settings``: the run's evaluation settings (the config's ``eval`` section: ``local``,
    ``local_max_examples``, ``generate_examples``, ``max_prompt_length``, ``max_new_tokens``,
    ``batch_size``); ``mesh``: the ``clients`` mesh the batches are shared out over (None: one device).
    """

    def __init__(self, evaluator: Evaluator, data: FederatedData, settings, seed: int, mesh=None):
        ev, devices = evaluator, (client_groups(mesh) if mesh is not None else 1)  # the batch axis' groups
        self.evaluator, self.data, self.settings = evaluator, data, settings
        self.global_fn, self.local_fn = ev.compile(mesh)
        self.global_arrays = data.global_test
        self.global_n = len(next(iter(self.global_arrays.values())))
        batches, index = eval_batches(self.global_arrays, ev.batch_size, ev.num_tokens)
        # the batch axis is shared out over the devices: padded with empty batches to a multiple
        self.global_index = np.pad(index, ((0, -index.shape[0] % devices), (0, 0)), constant_values=-1)
        self.global_batches = jax.tree.map(jnp.asarray, pad_rows(batches, devices))
        self.local_arrays, self.local_sizes = local_subsets(data, settings.local_max_examples, seed)
        self.local_offsets = offsets_of(self.local_sizes)
        self.local_batches: dict = {}  # client id -> its local test batches, built on first use
        # every cohort's local batches have the same static count: the most any client needs
        most = max(eval_batch_count(client_rows(self.local_arrays, self.local_offsets, self.local_sizes,
                                            u)["attention_mask"], ev.batch_size, ev.local_num_tokens)
                   for u in range(data.num_clients))
        self.local_num_batches = -(-most // devices) * devices

    def global_metrics(self, state) -> dict:
        preds, losses = jax.device_get(self.global_fn(state.params, state.frozen, self.global_batches))
        preds, losses = (
            unbatch(preds, self.global_index, self.global_n),
            unbatch(losses, self.global_index, self.global_n),
        )
        valid = np.ones(self.global_n, bool)
        out = score(self.data.name, self.data.task, preds, losses, self.global_arrays, valid)
        generation, cfg = self.data.generation, self.settings
        if generation is not None and cfg.generate_examples:
            n = min(cfg.generate_examples, len(generation.prompts))
            out["exact_match"], _ = gsm8k_exact_match(
                self.evaluator.graphdef, state.params, state.frozen, generation.tokenizer, generation.prompts[:n],
                generation.references[:n], cfg.max_prompt_length, cfg.max_new_tokens, cfg.batch_size,
                generation.eos_token)
        return out

    def metrics(self, state, client_base, client_params, cohort: np.ndarray, taking_part: np.ndarray,
                headline: str) -> dict:
        """The evaluation fields of a round's record: ``global_*`` (the new global model),
        ``local_*`` (each cohort client's trained factors on ``client_base``, the base it
        trained on), the local-global gap of the headline metric and ``eval_s``."""
        t_eval = time.perf_counter()
        record = {f"global_{k}": v for k, v in self.global_metrics(state).items()}
        if self.settings.local:
            record.update({f"local_{k}": v for k, v in self.local_metrics(client_base, client_params, cohort,
                                                                          taking_part).items()})
            if f"local_{headline}" in record:
                record["local_global_gap"] = record[f"local_{headline}"] - record[f"global_{headline}"]
        record["eval_s"] = time.perf_counter() - t_eval
        return record

    def local_metrics(self, frozen, client_params, cohort: np.ndarray, taking_part: np.ndarray | None = None) -> dict:
        """Each cohort client's trained model (``client_params`` [K, ...] leaves on the base
        ``frozen``) on its own local test rows, weighted by their counts; slots with
        ``taking_part`` False (empty Poisson-cohort slots) weigh 0."""
        sizes = self.local_sizes[cohort] * (1 if taking_part is None else taking_part)
        if sizes.sum() == 0:
            return {}
        batches, index = client_eval_batches(self.local_arrays, self.local_offsets, self.local_sizes, cohort,
                                             self.evaluator.batch_size, self.evaluator.local_num_tokens,
                                             self.local_num_batches, self.local_batches)
        preds, losses = jax.device_get(self.local_fn(client_params, frozen, jax.tree.map(jnp.asarray, batches)))
        per_client = []
        for i, (u, n) in enumerate(zip(cohort, sizes)):
            if not n:
                per_client.append({})
                continue
            client = client_rows(self.local_arrays, self.local_offsets, self.local_sizes, u)
            kept = int(self.local_sizes[u])
            client_preds, client_losses = unbatch(preds[i], index[i], kept), unbatch(losses[i], index[i], kept)
            per_client.append(score(self.data.name, self.data.task, client_preds, client_losses, client,
                                    np.ones(kept, bool)))
        return weighted_client_metrics(per_client, sizes)


def local_subsets(data: FederatedData, limit: int | None, seed: int) -> tuple[dict, np.ndarray]:
    """Each client's local test rows, at most ``limit`` of them (a seeded random subset, kept in
    order): arrays [M, ...] client after client, and the kept counts [U]."""
    counts = data.num_local_test
    rng = np.random.default_rng(seed)
    kept = counts if limit is None else np.minimum(counts, limit)
    offsets = data.local_test_offsets
    rows = [offsets[u] + np.sort(rng.choice(int(n), size=int(kept[u]), replace=False))
            for u, n in enumerate(counts) if n]
    order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return {k: v[order] for k, v in data.local_test.items()}, np.asarray(kept)

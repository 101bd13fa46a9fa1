"""Task kinds (classification, regression, causal LM) as objects: per-example losses, predictions
and the headline metric; and the forward pass.

A batch is a dict with ``input_ids`` [b, L], ``attention_mask`` [b, L], optional
``token_type_ids`` [b, L], and ``labels``: [b] int (classification), [b] float (regression) or
absent for causal LM, where the targets are the next tokens and ``loss_mask`` [b, L] (optional,
default the attention mask) marks the target tokens that are scored: ``loss_mask[:, t] = 1``
scores the output at position t - 1 on token t (so column 0 is never used). This is how
:func:`fedlora_jax.data.tokenise.tokenize_prompt_answer` builds it (1 on the answer tokens), so
every answer token, the first one included, is a target and no prompt or padding token is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedlora_jax.models.lora import ClientRouting, route_clients


def forward(model, batch: dict) -> jax.Array:
    """Logits: [b, num_labels] for classification / regression, [b, L, V] for causal LM.

    A packed batch (``batch["packing"]``, see :func:`fedlora_jax.data.packing.pack`) gives
    [b, num_labels] per example, or [1, T, V] over the stream for causal LM. A stream shared by
    several clients (``packing.clients`` > 1) takes trainable leaves with a leading client axis.
    """
    _route(model, batch)
    packing, mask = batch.get("packing"), batch.get("attention_mask")
    if "token_type_ids" in batch:
        return model(batch["input_ids"], mask, batch["token_type_ids"], packing=packing)
    return model(batch["input_ids"], mask, packing=packing)


def _route(model, batch: dict) -> None:
    """Points the trainable layers at each stream token's client when a packed stream is shared."""
    packing = batch.get("packing")
    if packing is not None and packing.clients > 1:
        route_clients(model, ClientRouting(packing.token_clients(), packing.clients))


LOGIT_BLOCK = 128  # tokens whose logits a blockwise causal-LM loss holds at once


class TaskKind:
    """What a task kind is to the engine and the evaluators: its per-example loss, its predictions
    and the metric a run is judged by. One object per kind (:data:`TASK_KINDS`)."""

    name: str = ""
    headline: str = ""  # the metric a run of this kind is judged by (``global_<headline>`` in its records)

    def outputs(self, num_labels: int) -> int:
        """Width of the classification/regression head for ``num_labels`` classes (0: a language model head)."""
        return num_labels

    def loss(self, logits: jax.Array, batch: dict) -> jax.Array:
        """Loss of each example, [b]."""
        raise NotImplementedError

    def predictions(self, logits: jax.Array) -> jax.Array:
        raise NotImplementedError


class Classification(TaskKind):
    name, headline = "classification", "accuracy"

    def loss(self, logits, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])

    def predictions(self, logits):
        """Class ids [b]."""
        return jnp.argmax(logits, axis=-1)


class Regression(TaskKind):
    name, headline = "regression", "pearson"

    def outputs(self, num_labels: int) -> int:
        return 1

    def loss(self, logits, batch):
        return jnp.square(logits[..., 0].astype(jnp.float32) - batch["labels"].astype(jnp.float32))

    def predictions(self, logits):
        """Regression values [b]."""
        return logits[..., 0].astype(jnp.float32)


class CausalLM(TaskKind):
    name, headline = "causal_lm", "token_accuracy"

    def loss(self, logits, batch):
        """Mean cross-entropy of the scored targets, i.e. of the output at position t - 1 on token
        t for every t >= 1 with ``loss_mask[:, t] = 1`` (0 for an example with none)."""
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                                     batch["input_ids"][:, 1:])
        return self.scored_mean(token_loss, batch)

    def loss_from_hidden(self, hidden: jax.Array, weight: jax.Array, batch: dict,
                         block: int | None = LOGIT_BLOCK) -> jax.Array:
        """:meth:`loss` from the final hidden states [b, L, H] and the output matrix ``weight``
        [H, V]. With ``block`` the logits are computed and differentiated ``block`` tokens at a
        time (:func:`blockwise_cross_entropy`), so no [L, V] logits are held. A packed stream
        listing its scored positions (``packing.score_index``) takes logits at those only."""
        packing = batch.get("packing")
        if packing is not None and packing.score_index is not None:
            return self._scored_loss(hidden, weight, batch, block)
        targets = batch["input_ids"][:, 1:]
        h = hidden[:, :-1]
        token_loss = blockwise_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), block)
        return self.scored_mean(token_loss.reshape(targets.shape), batch)

    def _scored_loss(self, hidden: jax.Array, weight: jax.Array, batch: dict, block: int | None) -> jax.Array:
        """Per-example losses [b] of a packed stream [1, T, H] from its S listed scored positions."""
        packing = batch["packing"]
        index = packing.score_index  # [S], then T - 1 (never scored)
        length = hidden.shape[1]
        targets = batch["input_ids"][0, jnp.minimum(index + 1, length - 1)]
        picked = hidden[0, index]  # [S, H]
        if block is None:
            token_loss = optax.softmax_cross_entropy_with_integer_labels((picked @ weight).astype(jnp.float32), targets)
        else:
            token_loss = blockwise_cross_entropy(picked, weight, targets, block)
        scored = packing.scored_next(batch.get("loss_mask"))[index].astype(jnp.float32)
        owner = packing.segment_ids[0, index] - 1  # the example of each scored position
        sums = jax.ops.segment_sum(token_loss * scored, owner, packing.num_examples)
        counts = jax.ops.segment_sum(scored, owner, packing.num_examples)
        return sums / jnp.maximum(counts, 1.0)

    def scored_mean(self, token_loss: jax.Array, batch: dict) -> jax.Array:
        """Per-example mean of the next-token losses [b, L-1] over the scored targets."""
        packing = batch.get("packing")
        if packing is None:
            scored = batch.get("loss_mask", batch["attention_mask"])[:, 1:].astype(jnp.float32)
            return jnp.sum(token_loss * scored, axis=-1) / jnp.maximum(jnp.sum(scored, axis=-1), 1.0)
        owner = packing.segment_matrix()[:, 1:]  # [b, T-1]: the example of each scored successor
        weights = packing.scored_next(batch.get("loss_mask"))[:-1].astype(jnp.float32)
        return (owner @ (token_loss[0] * weights)) / jnp.maximum(owner @ weights, 1.0)

    def predictions(self, logits):
        """Next-token ids [b, L-1]."""
        return jnp.argmax(logits[:, :-1], axis=-1)


def blockwise_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, block: int) -> jax.Array:
    """Cross-entropy of each token's logits ``hidden @ weight`` against its target, ``block``
    tokens at a time under ``jax.checkpoint``: the forward keeps no logits and the backward
    recomputes one block's [block, V] at a time.

    Args:
      hidden: [T, H] final hidden states.
      weight: [H, V] output matrix.
      targets: [T] int token ids.
      block: tokens per block (T is padded to a multiple).

    Returns:
      [T] float32 losses.
    """
    length = hidden.shape[0]
    pad = -length % block
    blocks = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((-1, block) + x.shape[1:])

    @jax.checkpoint
    def one(args):
        h, t = args
        logits = (h @ weight).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t)

    return jax.lax.map(one, (blocks(hidden), blocks(targets))).reshape(-1)[:length]


def model_losses(model, batch: dict, task: str) -> jax.Array:
    """Per-example training losses [b] of ``model`` on ``batch``. A language model that exposes its
    output matrix (``output_weight()``) scores from its hidden states
    (:meth:`CausalLM.loss_from_hidden`) when that saves work: a packed stream listing its scored
    positions takes logits at those only, and a model that rematerialises (``model.remat`` set)
    takes them blockwise; otherwise the loss of the full logits (:func:`forward`)."""
    kind = task_kind(task)
    packing = batch.get("packing")
    remat = getattr(model, "remat", None)
    scored_only = packing is not None and packing.score_index is not None
    weight = model.output_weight() if isinstance(kind, CausalLM) and (remat or scored_only) else None
    if weight is None:
        return kind.loss(forward(model, batch), batch)
    _route(model, batch)
    hidden = model.hidden_states(batch["input_ids"], batch.get("attention_mask"), packing=packing)
    return kind.loss_from_hidden(hidden, weight, batch, LOGIT_BLOCK if remat else None)


TASK_KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classification(), Regression(), CausalLM())}


def task_kind(name: str) -> TaskKind:
    """The task kind called ``name`` (``classification``, ``regression``, ``causal_lm``)."""
    if name not in TASK_KINDS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASK_KINDS)})")
    return TASK_KINDS[name]


def per_example_loss(logits: jax.Array, batch: dict, task: str) -> jax.Array:
    """Loss of each example, [b], of the task kind called ``task`` (:meth:`TaskKind.loss`)."""
    return task_kind(task).loss(logits, batch)


def predictions(logits: jax.Array, task: str) -> jax.Array:
    """Class ids [b], regression values [b], or next-token ids [b, L-1] (:meth:`TaskKind.predictions`)."""
    return task_kind(task).predictions(logits)

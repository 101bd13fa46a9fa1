"""Where one padded local step's time goes: ablations and an operator profile.

The step: forward and backward of a MiniLM-shaped BERT (6 layers, hidden 384, 12 heads, random
weights; LoRA r = 8 on query/value, [CLS] head) on ``--rows`` padded rows of ``--length`` tokens,
gradients with respect to the trainable leaves, as in a local step of W1 with
``data.packing: null`` (``--rows 32``: the two clients of a CPU ``auto`` chunk).

Ablations: the step with attention (and the query/key projections it makes dead), GELU or
LayerNorm removed, each traced and compiled on its own, timed interleaved with the full step.
Profile: a ``jax.profiler`` trace of the full step, operator time by kind (YNNPACK matmul fusions,
transposes, elementwise fusions).

  python scripts/profile_step.py                  # 32 x 64, 9 repeats
  python scripts/profile_step.py --rows 16 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from fedlora_jax.models import bert, create_model  # noqa: E402
from fedlora_jax.models.lora import LoRAConfig, inject_lora, split_model  # noqa: E402
from fedlora_jax.tasks import forward, per_example_loss  # noqa: E402

MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536}


def step_function(rows: int, length: int):
    """(jitted gradient step, trainable params) of the padded step."""
    model = create_model("bert", MINILM, task="classification", num_labels=2, seed=0)
    inject_lora(model, LoRAConfig(rank=8, alpha=8, targets=("query", "value")), jax.random.key(1))
    graphdef, params, frozen = split_model(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (rows, length)), jnp.int32)
    real = rng.integers(5, length, rows)
    batch = {"input_ids": ids, "attention_mask": jnp.asarray(np.arange(length)[None] < real[:, None], jnp.int32),
             "token_type_ids": jnp.zeros_like(ids), "labels": jnp.asarray(rng.integers(0, 2, rows))}

    def loss(p):
        return jnp.mean(per_example_loss(forward(nnx.merge(graphdef, p, frozen), batch), batch, "classification"))

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params))  # traces and compiles now, under whatever is patched
    return step, params


def ablations(rows: int, length: int) -> dict:
    """Compiled steps by name: full, and with attention / GELU / LayerNorm removed."""
    steps = {"full": step_function(rows, length)}
    attention, gelu, layer_norm = bert.attention.padding_attention, bert.ACTIVATIONS["gelu"], nnx.LayerNorm.__call__
    try:
        bert.attention.padding_attention = lambda q, k, v, mask: v[:, :q.shape[1]]
        steps["no attention (nor the query/key projections)"] = step_function(rows, length)
        bert.attention.padding_attention = attention
        bert.ACTIVATIONS["gelu"] = lambda x: x
        steps["no GELU"] = step_function(rows, length)
        bert.ACTIVATIONS["gelu"] = gelu
        nnx.LayerNorm.__call__ = lambda self, x: x * self.scale[...] + self.bias[...]
        steps["no LayerNorm"] = step_function(rows, length)
    finally:
        bert.attention.padding_attention, bert.ACTIVATIONS["gelu"], nnx.LayerNorm.__call__ = attention, gelu, layer_norm
    return steps


def operator_profile(step, params, repeats: int = 3) -> collections.Counter:
    """Operator milliseconds per step by kind (fusion name without its number) from a profiler trace."""
    from jax._src.lib import _profiler
    from jax.profiler import ProfileData

    session = _profiler.ProfilerSession()
    for _ in range(repeats):
        jax.block_until_ready(step(params))
    profile = ProfileData.from_serialized_xspace(session.stop())
    kinds = collections.Counter()
    for plane in profile.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                name = event.name
                if re.match(r"^(ynn_fusion|\w+_fusion|dot|wrapped_\w+)(\.\d+)?$", name):
                    kinds[re.sub(r"\.\d+$", "", name)] += event.duration_ns / 1e6 / repeats
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    steps = ablations(args.rows, args.length)
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (step, params) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params))
            times[name].append(time.perf_counter() - t0)
    full = statistics.median(times["full"])
    print(f"step of {args.rows} x {args.length} tokens, {jax.device_count()} {jax.default_backend()} device(s)")
    print("| variant | ms | vs full |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.0f} | {statistics.median(values) / full:.2f} |")
    kinds = operator_profile(*steps["full"])
    total = sum(kinds.values())
    print(f"\noperator time by kind ({total:.0f} ms per step, summed over threads):")
    print("| kind | ms | share |\n|---|---|---|")
    for kind, ms in kinds.most_common(12):
        print(f"| {kind} | {ms:.1f} | {ms / total:.1%} |")


if __name__ == "__main__":
    main()

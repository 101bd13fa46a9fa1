"""Benchmark: a DP-SGD round vs the non-DP round on a MiniLM-sized model.

The model has MiniLM's shape (6 layers, hidden 384, 12 heads, intermediate 1536, vocab 30522;
random weights: the cost does not depend on their values), LoRA r = 8 on query/value, 8 clients,
batch 16, sequence 64, on the synthetic task. DP-SGD uses Poisson sampling (the engine's buffer,
sized for overflow probability 1e-12 per step for the data and its add-one neighbour, so it has
far more slots than 16 by design) and, for a like-for-like batch, shuffled fixed-size batches.
Per-example gradients are materialised only for the LoRA + head parameters.

  python scripts/bench_dp.py --out runs/bench_dp.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from bench_round import bench_engine_round

MINILM_SIZED = {
    "name": "bench_dp",
    "model": {"arch": "bert", "config": {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                                          "num_attention_heads": 12, "intermediate_size": 1536,
                                          "max_position_embeddings": 512}},
    "lora": {"rank": 8, "alpha": 16},
    "data": {"num_clients": 8, "vocab_size": 30522, "seq_len": 64, "examples_per_client": [64, 64],
             "test_examples": 16},
    "federation": {"clients_per_round": 8, "batch_size": 16, "local_steps": 2, "rounds": 1},
}
DP = ["privacy.record_level=true", "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_dp.json")
    args = parser.parse_args()
    variants = {"non-DP": [], "DP-SGD, shuffled batches of 16": DP + ["privacy.sampling=shuffle"],
                "DP-SGD, Poisson sampling": DP + ["privacy.sampling=poisson"]}
    results = {}
    for name, overrides in variants.items():
        config, exp, compile_s, round_s = bench_engine_round(MINILM_SIZED, overrides, args.repeats)
        trainer = exp.federation.trainer
        batch = trainer.dp.buffer_size if trainer.dp and trainer.dp.poisson else trainer.batch_size
        results[name] = {"compile_s": compile_s, "round_s": round_s, "examples_per_step": batch}
    base = results["non-DP"]["round_s"]
    for r in results.values():
        r["ratio_to_non_dp"] = r["round_s"] / base
    trainable = sum(x.size for x in jax.tree.leaves(exp.params))
    report = {"backend": jax.default_backend(), "jax": jax.__version__, "trainable_params": int(trainable),
              "setup": MINILM_SIZED, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"backend: {report['backend']}, jax {report['jax']}, trainable (per-example-gradient) params: {trainable:,}")
    print("| variant | examples per step | compile s | s/round | x non-DP |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['examples_per_step']} | {r['compile_s']:.1f} | {r['round_s']:.2f} | "
              f"{r['ratio_to_non_dp']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

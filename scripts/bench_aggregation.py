"""Benchmark the aggregation functions of fedlora_jax on the current JAX backend.

Times one jitted call per method (after a compile/warm-up call, with block_until_ready; the
median of several calls) over a grid of layer sizes d = d_out = d_in, client counts U and ranks r,
and compares low-rank FRA (QR + small SVD, M never formed) with the dense path (form M, full SVD,
truncate). Prints Markdown tables and optionally writes JSON.

Full run (as recorded in docs/aggregation.md):
    nice -n 10 python scripts/bench_aggregation.py --out runs/bench_aggregation.json
Smoke run:
    python scripts/bench_aggregation.py --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedlora_jax import aggregation as agg

FULL_GRID = {"dims": (1024, 4096), "clients": (3, 10, 100), "ranks": (8, 16), "dense_dim": 2048}
QUICK_GRID = {"dims": (256,), "clients": (3, 10), "ranks": (8,), "dense_dim": 512}
DENSE_CLIENTS, DENSE_RANK = 10, 8


def method_calls() -> dict:
    """name -> function of (B, A, w, round_index) to time.

    Every function receives a traced round index (only RoLoRA uses it); rank-taking methods use
    the client rank r; ``divergence`` is timed on the FedIT aggregate (FedIT time included).
    """
    return {
        "fedit": lambda B, A, w, t: agg.fedit(B, A, w),
        "ffa": lambda B, A, w, t: agg.ffa(B, A, w),
        "fra": lambda B, A, w, t: agg.fra(B, A, w, B.shape[2]),
        "flora_na": lambda B, A, w, t: agg.flora_na(B, A, w),
        "fedex": lambda B, A, w, t: agg.fedex(B, A, w),
        "flora": lambda B, A, w, t: agg.flora_stack(B, A, w),
        "fedsa": lambda B, A, w, t: agg.fedsa(B, A, w),
        "rolora": agg.rolora,
        "divergence": lambda B, A, w, t: agg.divergence(B, A, w, *agg.fedit(B, A, w)),
    }


def make_clients(key: jax.Array, dim: int, num_clients: int, rank: int):
    """Random float32 client factors B [U, d, r], A [U, r, d] and weights w [U] on the device."""
    key_b, key_a, key_w = jax.random.split(key, 3)
    B = jax.random.normal(key_b, (num_clients, dim, rank), jnp.float32) / np.sqrt(dim)
    A = jax.random.normal(key_a, (num_clients, rank, dim), jnp.float32) / np.sqrt(dim)
    w = jax.random.uniform(key_w, (num_clients,), jnp.float32, 0.5, 1.5)
    return B, A, w / jnp.sum(w)


def time_call(function, args, reps: int, budget_s: float) -> tuple[float, int]:
    """Median wall time (s) of ``function(*args)`` after one warm-up call; fewer reps if slow."""
    jax.block_until_ready(function(*args))  # compile + warm-up
    times = []
    while len(times) < reps and (len(times) < 3 or sum(times) < budget_s):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def fra_dense(B: jax.Array, A: jax.Array, w: jax.Array, rank: int):
    """Reference FRA: form M [d_out, d_in], full SVD, truncate, balanced split."""
    M = jnp.einsum("u,uor,uri->oi", w, B, A)
    u, s, vt = jnp.linalg.svd(M, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def compare_fra_with_dense(key: jax.Array, dim: int, reps: int, budget_s: float) -> dict:
    B, A, w = make_clients(key, dim, DENSE_CLIENTS, DENSE_RANK)
    low_rank = jax.jit(lambda B, A, w: agg.fra(B, A, w, DENSE_RANK))
    dense = jax.jit(lambda B, A, w: fra_dense(B, A, w, DENSE_RANK))
    time_low_rank, reps_low_rank = time_call(low_rank, (B, A, w), reps, budget_s)
    time_dense, reps_dense = time_call(dense, (B, A, w), reps, budget_s)
    product_low_rank = np.asarray(jnp.matmul(*low_rank(B, A, w)), np.float64)
    product_dense = np.asarray(jnp.matmul(*dense(B, A, w)), np.float64)
    return {
        "d": dim,
        "U": DENSE_CLIENTS,
        "r": DENSE_RANK,
        "rank": DENSE_RANK,
        "low_rank_ms": 1e3 * time_low_rank,
        "dense_ms": 1e3 * time_dense,
        "reps": [reps_low_rank, reps_dense],
        "speedup": time_dense / time_low_rank,
        "relative_difference": float(
            np.linalg.norm(product_low_rank - product_dense) / np.linalg.norm(product_dense)
        ),
    }


def markdown_table(results: list[dict], methods: list[str]) -> str:
    header = "| d | U | r | " + " | ".join(methods) + " |"
    lines = [header, "|" + "---|" * (3 + len(methods))]
    rows = {}
    for row in results:
        rows.setdefault((row["d"], row["U"], row["r"]), {})[row["method"]] = row["median_ms"]
    for (dim, num_clients, rank), by_method in rows.items():
        cells = [f"{by_method[m]:.3g}" if m in by_method else "-" for m in methods]
        lines.append(f"| {dim} | {num_clients} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="tiny grid (smoke run)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per case (default 5)")
    parser.add_argument(
        "--budget-s", type=float, default=20.0, help="stop timing a case after 3 calls once this is spent"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    grid = QUICK_GRID if args.quick else FULL_GRID
    calls = method_calls()
    key = jax.random.key(args.seed)
    round_index = jnp.asarray(0)
    results = []
    for dim, num_clients, rank in itertools.product(grid["dims"], grid["clients"], grid["ranks"]):
        key, subkey = jax.random.split(key)
        B, A, w = make_clients(subkey, dim, num_clients, rank)
        for name, function in calls.items():
            seconds, reps = time_call(jax.jit(function), (B, A, w, round_index), args.reps, args.budget_s)
            results.append(
                {"method": name, "d": dim, "U": num_clients, "r": rank, "median_ms": 1e3 * seconds, "reps": reps}
            )
            print(f"d={dim} U={num_clients} r={rank} {name}: {1e3 * seconds:.3g} ms", file=sys.stderr, flush=True)
    key, subkey = jax.random.split(key)
    dense = compare_fra_with_dense(subkey, grid["dense_dim"], args.reps, args.budget_s)
    device = jax.devices()[0]
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "results": results,
        "fra_vs_dense": dense,
    }
    print(f"\nMedian ms per jitted call on {report['backend']} ({report['device']}), jax {jax.__version__}:\n")
    print(markdown_table(results, list(calls)))
    print(
        f"\nFRA low-rank vs dense (d={dense['d']}, U={dense['U']}, r={dense['r']}, rank {dense['rank']}): "
        f"{dense['low_rank_ms']:.3g} ms vs {dense['dense_ms']:.3g} ms, speed-up {dense['speedup']:.1f}x, "
        f"relative difference of the products {dense['relative_difference']:.2e}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

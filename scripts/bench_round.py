"""Benchmark: one vmapped federated round vs the same jitted local update called client by client.

For each cohort size K, both variants do identical work (K clients x local_steps steps, then
FedIT aggregation) on the quickstart model. Reports compile time, seconds per round after
compilation (median of --repeats rounds) and client-steps per second; writes JSON.

  python scripts/bench_round.py --out runs/bench_round.json            # cohorts 1, 8, 32
  python scripts/bench_round.py --cohorts 1,8 --repeats 3 --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedlora_jax.engine import train_clients  # noqa: E402
from fedlora_jax.config import load_config  # noqa: E402
from fedlora_jax.params import factor_mask  # noqa: E402
from fedlora_jax.engine import device_shards, init_server_state  # noqa: E402
from fedlora_jax.run import build_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` (which must block until its results are ready)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cohort_overrides(cohort: int, chunk: int | None = None) -> list[str]:
    out = [f"data.num_clients={max(cohort, 2)}", f"federation.clients_per_round={cohort}"]
    return out + ([f"federation.clients_per_chunk={chunk}"] if chunk else [])


@dataclasses.dataclass
class EngineRound:
    """The engine's jitted round, compiled for one config: ``run_once()`` runs it to completion (from
    the same initial state every time)."""

    config: Any
    exp: Any
    compiled: Any
    state: Any
    shards: Any
    compile_s: float

    def run_once(self):
        return jax.block_until_ready(self.compiled(self.state, self.shards))


def compile_engine_round(config_path: Path | dict, overrides: list[str]) -> EngineRound:
    """Builds the experiment of ``config_path`` + ``overrides`` and compiles its round (not donating)."""
    config = load_config(config_path, overrides)
    exp = build_experiment(config)
    fed = exp.federation
    shards = fed.replicated(device_shards(exp.data))  # placed on the mesh as runs place them
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)  # placed as runs place it
    t0 = time.perf_counter()
    compiled = fed.compile_round(donate=False, template=state).lower(state, shards).compile()
    return EngineRound(config, exp, compiled, state, shards, time.perf_counter() - t0)


def compiled_round(config_path: Path | dict, overrides: list[str]):
    """(config, experiment, zero-argument function running one compiled round to completion,
    compile seconds) of the engine's jitted round."""
    built = compile_engine_round(config_path, overrides)
    return built.config, built.exp, built.run_once, built.compile_s


def bench_engine_round(config_path: Path | dict, overrides: list[str], repeats: int):
    """(config, experiment, compile seconds, median seconds per round) of the engine's jitted round."""
    config, exp, one_round, compile_s = compiled_round(config_path, overrides)
    one_round()
    return config, exp, compile_s, timed(one_round, repeats)


def bench_cohort(config_path: Path, cohort: int, chunk: int, repeats: int) -> dict:
    config, exp, vmapped_compile, vmapped_s = bench_engine_round(config_path, cohort_overrides(cohort), repeats)
    fed = exp.federation
    shards = device_shards(exp.data)
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)

    # loop: the same local update, jitted per client, called K times; then the same aggregation
    mask = factor_mask(fed.layout, state.params, 1.0, 1.0)
    def one_client(frozen, params, offset, n, key):  # a group of one client
        params, offset, n, key = jax.tree.map(lambda x: x[None], (params, offset, n, key))
        return jax.tree.map(lambda x: x[0], train_clients(fed.trainer, frozen, params, shards.arrays, offset, n, key,
                                                          jnp.int32(0), mask))

    one_client = jax.jit(one_client)
    aggregate = jax.jit(lambda stacked, w: fed.aggregate(stacked, w, jnp.int32(0), jax.random.key(0), state.frozen))
    cohort_ids = list(range(cohort))
    keys = jax.random.split(jax.random.key(1), cohort)
    counts = shards.num_examples[jnp.array(cohort_ids)]
    weights = (counts / counts.sum()).astype(jnp.float32)

    def loop_round():
        trained = [one_client(state.frozen, state.params, shards.offsets[u], shards.num_examples[u], keys[u])[0]
                   for u in cohort_ids]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trained)
        jax.block_until_ready(aggregate(stacked, weights))

    t0 = time.perf_counter()
    loop_round()  # compiles the per-client update and the aggregation
    loop_compile = time.perf_counter() - t0
    loop_s = timed(loop_round, repeats)
    steps = cohort * config.federation.local_steps
    result = {
        "cohort": cohort,
        "local_steps": config.federation.local_steps,
        "batch_size": config.federation.batch_size,
        "vmapped": {"compile_s": vmapped_compile, "round_s": vmapped_s, "client_steps_per_s": steps / vmapped_s},
        "loop": {"compile_s": loop_compile, "round_s": loop_s, "client_steps_per_s": steps / loop_s},
        "speedup": loop_s / vmapped_s,
    }
    if chunk and cohort > chunk:
        _, _, chunked_compile, chunked_s = bench_engine_round(config_path, cohort_overrides(cohort, chunk), repeats)
        result["chunked"] = {"clients_per_chunk": chunk, "compile_s": chunked_compile, "round_s": chunked_s,
                             "client_steps_per_s": steps / chunked_s}
        result["chunked_speedup"] = loop_s / chunked_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    parser.add_argument("--cohorts", default="1,8,32", help="comma-separated cohort sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median reported)")
    parser.add_argument("--chunk", type=int, default=8,
                        help="also time the engine with clients_per_chunk=CHUNK for larger cohorts (0: skip)")
    parser.add_argument("--out", default="runs/bench_round.json")
    args = parser.parse_args()
    results = [bench_cohort(Path(args.config), int(k), args.chunk, args.repeats) for k in args.cohorts.split(",")]
    report = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "config": args.config, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"backend: {report['backend']} ({report['devices'][0]}), jax {report['jax']}")
    print("| clients | variant | compile s | s/round | client-steps/s | speed-up vs loop |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rows = [("loop (jitted client update x K)", r["loop"], 1.0), ("vmapped round", r["vmapped"], r["speedup"])]
        if "chunked" in r:
            rows.append((f"vmapped, chunks of {r['chunked']['clients_per_chunk']}", r["chunked"], r["chunked_speedup"]))
        for name, v, speedup in rows:
            print(f"| {r['cohort']} | {name} | {v['compile_s']:.2f} | {v['round_s']:.4f} | "
                  f"{v['client_steps_per_s']:.0f} | {speedup:.2f}x |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

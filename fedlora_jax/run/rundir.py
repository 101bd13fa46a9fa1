"""The run directory: the resolved config, per-round logs, the summary, and the checks that a
directory is (or may become) one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from fedlora_jax.config import Config, ConfigError


def check_run_dir(path: Path) -> None:
    """Raises :class:`ConfigError` unless ``path`` is a run directory (holds its config.yaml)."""
    if not (Path(path) / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a run directory (no config.yaml)")


class RunLog:
    """The run directory: resolved config, metrics.jsonl, divergence.jsonl, summary.json.

    A new run needs an empty or absent directory; a resumed one (``resume``) needs the run's own
    directory with its config.yaml. Without ``writes`` (the other processes of a multi-process
    run) it only reads."""

    def __init__(self, out_dir: Path | None, config: Config, resume: bool = False, writes: bool = True):
        self.dir, self.writes = out_dir, writes
        if out_dir is None:
            if resume:
                raise ConfigError("resuming needs the run directory")
            return
        if not writes and not resume:
            return
        if resume:
            check_run_dir(out_dir)
            return
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ConfigError(f"run directory {out_dir} already exists and is not empty")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        for name in ("metrics.jsonl", "divergence.jsonl"):  # present even when no round is logged
            (out_dir / name).touch()

    def append(self, filename: str, record: dict) -> None:
        if self.dir is not None and self.writes:
            with open(self.dir / filename, "a") as fh:
                fh.write(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON

    def round(self, record: dict) -> None:
        """Logs a round: its metrics (``record`` less ``"modules"``) and its per-module divergence."""
        self.append("metrics.jsonl", {k: v for k, v in record.items() if k != "modules"})
        self.append("divergence.jsonl", {"round": record["round"], **record["modules"]})

    def write(self, filename: str, record: dict) -> None:
        if self.dir is not None and self.writes:
            (self.dir / filename).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")

    def truncate(self, rounds: int) -> list[dict]:
        """Keeps the records of rounds 1..``rounds`` in the per-round logs (atomically, each
        file); returns the metrics.jsonl records kept."""
        kept = {}
        for name in ("metrics.jsonl", "divergence.jsonl"):
            path = self.dir / name
            lines = path.read_text().splitlines() if path.exists() else []
            records = [json.loads(line) for line in lines if line.strip()]
            kept[name] = [r for r in records if r["round"] <= rounds]
            if [r["round"] for r in kept[name]] != list(range(1, rounds + 1)):
                raise ConfigError(f"{path} does not hold rounds 1..{rounds} of the checkpoint")
            if not self.writes:
                continue
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept[name]))
            os.replace(tmp, path)
        return kept["metrics.jsonl"]

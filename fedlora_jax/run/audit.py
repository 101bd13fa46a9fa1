"""``fedlora-jax audit``: the config's DP mechanisms run with canaries; an empirical lower bound on
epsilon beside the accountant's (mechanism side: :mod:`fedlora_jax.privacy.audit`).

The config is built as for a run (data, model, ledger): the audit takes from it the trainable
tree and what clients train, the noise multipliers that run (calibrated from a target epsilon
as a run calibrates them), the clip norms, the sampling rates and the number of releases.
Record level audits the client with the largest rate taking part in every round (the case the
calibration covers); user level audits canary clients over every round.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import yaml
from rich.table import Table

from fedlora_jax.config import Config, ConfigError, cohort_size
from fedlora_jax.params import factor_mask
from fedlora_jax.privacy import epsilon
from fedlora_jax.privacy.audit import (
    SIGNIFICANCE,
    Mechanism,
    canary_directions,
    canary_inclusion,
    epsilon_lower_bound,
    largest_certifiable,
    record_level_scores,
    user_level_scores,
)
from fedlora_jax.run.build import build_experiment

# Canary gradients (and canary clients' updates) are this many clip norms long: clipping brings
# them to C (S); a mechanism that forgets to clip lets them through at full length.
CANARY_NORM = 10.0
DEFAULT_CANARIES = 1000

# Test hook: (level, the mechanism as built) -> the mechanism that runs. The accounted epsilon
# stays the one of the mechanism as built, so a hook that breaks it must be caught by the bound.
Tamper = Callable[[str, Mechanism], Mechanism]


def audit(config: Config, num_canaries: int = DEFAULT_CANARIES, tamper: Tamper | None = None) -> dict:
    """Audits every DP level the config turns on; returns ``{level: result}`` (see :func:`_result`).

    Raises:
      ConfigError: when the config has no DP level on, shuffled record-level batches, or fewer than 2
        canaries.
    """
    p = config.privacy
    if not (p.record_level or p.user_level):
        raise ConfigError("audit needs privacy.record_level or privacy.user_level to be true")
    if p.record_level and p.sampling != "poisson":
        raise ConfigError("audit needs privacy.sampling=poisson: shuffled batches are accounted as Poisson only "
                          "approximately, and the audit samples canaries as the accountant assumes")
    if num_canaries < 2:
        raise ConfigError(f"--canaries must be at least 2, got {num_canaries}")
    exp = build_experiment(config)
    f, ledger, fed = config.federation, exp.ledger, exp.federation
    directions_key, inclusion_key, run_key = jax.random.split(jax.random.key(config.seed), 3)
    included = canary_inclusion(inclusion_key, num_canaries)
    train_mask = factor_mask(fed.layout, exp.params, *fed.method.trains(0))
    directions = canary_directions(directions_key, num_canaries, exp.params, train_mask)
    tamper = tamper or (lambda level, mechanism: mechanism)
    results = {}
    if p.record_level:
        built = Mechanism(p.clip_norm, ledger.noise_multiplier, float(ledger.client_rates.max()),
                          f.rounds * f.local_steps)
        scores = record_level_scores(jax.random.fold_in(run_key, 0), directions, included,
                                     tamper("record_level", built), CANARY_NORM * p.clip_norm,
                                     p.per_layer_clipping, train_mask)
        accounted = epsilon(built.noise_multiplier, built.sampling_rate, built.releases, p.delta, p.accountant)
        results["record_level"] = _result(built, scores, included, accounted, p.delta, "example")
    if p.user_level:
        k = cohort_size(config)
        built = Mechanism(p.user_clip_norm, ledger.user_noise_multiplier, k / exp.data.num_clients, f.rounds)
        scores = user_level_scores(jax.random.fold_in(run_key, 1), directions, included, tamper("user_level", built),
                                   CANARY_NORM * p.user_clip_norm, float(k), train_mask)
        results["user_level"] = _result(built, scores, included, ledger.user_epsilon(f.rounds), p.delta, "client")
    return results


def _result(mechanism: Mechanism, scores: np.ndarray, included: np.ndarray, accounted: float, delta: float,
            unit: str) -> dict:
    """What audit.json keeps for one level."""
    return {
        "epsilon_lower_bound": epsilon_lower_bound(scores, included, delta),
        "confidence": 1.0 - SIGNIFICANCE,
        "epsilon_accounted": accounted if math.isfinite(accounted) else None,
        "delta": delta,
        "largest_certifiable": largest_certifiable(included, delta),
        "canaries": int(included.size),
        "canaries_in": int(included.sum()),
        "canary_unit": unit,
        "noise_multiplier": mechanism.noise_multiplier,
        "clip_norm": mechanism.clip_norm,
        "sampling_rate": mechanism.sampling_rate,
        "releases": mechanism.releases,
        "scores": [float(s) for s in scores],
        "included": [bool(i) for i in included],
    }


def check_out_dir(out_dir: Path) -> None:
    """Raises :class:`ConfigError` unless ``out_dir`` is absent or empty (checked before auditing)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"output directory {out_dir} already exists and is not empty")


def write_audit(config: Config, results: dict, out_dir: Path) -> Path:
    """Writes ``out_dir/config.yaml`` and ``out_dir/audit.json`` (new or empty directory); returns
    the path of audit.json."""
    check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    path = out_dir / "audit.json"
    path.write_text(json.dumps({"name": config.name, **results}, indent=1, allow_nan=False) + "\n")
    return path


def audit_table(results: dict, title: str) -> Table:
    """One row per audited level: the bound, its confidence, the accounted epsilon and the largest
    bound the canaries could certify."""
    table = Table(title=title)
    for column in ("level", "canaries", "in", "sigma", "eps lower bound", "confidence", "eps accounted",
                   "max certifiable", "delta"):
        table.add_column(column, justify="left" if column == "level" else "right")
    for level, r in results.items():
        accounted = "inf" if r["epsilon_accounted"] is None else f"{r['epsilon_accounted']:.3f}"
        table.add_row(level.replace("_level", ""), str(r["canaries"]), str(r["canaries_in"]),
                      f"{r['noise_multiplier']:.4g}", f"{r['epsilon_lower_bound']:.3f}", f"{r['confidence']:.0%}",
                      accounted, f"{r['largest_certifiable']:.3f}", f"{r['delta']:g}")
    return table

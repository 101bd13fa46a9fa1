"""The canary audit: it catches broken DP mechanisms (its lower bound exceeds the epsilon they
claim) and never contradicts the accountant on the mechanisms as built."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedlora_jax.cli import main
from fedlora_jax.privacy.audit import (
    Mechanism,
    canary_directions,
    canary_inclusion,
    epsilon_lower_bound,
    largest_certifiable,
    record_level_scores,
)
from fedlora_jax.run.audit import audit
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CANARIES = 500  # at most the tiny model's trainable coordinates, so the canaries are orthonormal
# 2 clients of 40 rows (32 to train), batch 4: q = 1/8, 8 rounds x 5 steps = 40 DP-SGD steps
RECORD = {"data.num_clients": 2, "data.examples_per_client": "[40,40]", "federation.clients_per_round": 2,
          "federation.batch_size": 4, "federation.rounds": 8, "federation.local_steps": 5,
          "privacy.record_level": "true", "privacy.target_epsilon": 1}
USER = {"federation.rounds": 8, "privacy.user_level": "true", "privacy.user_target_epsilon": 1}

BROKEN = {
    "noise off": lambda level, m: m._replace(noise_multiplier=0.0),
    "noise a tenth of its scale": lambda level, m: m._replace(noise_multiplier=m.noise_multiplier / 10),
    "clipping off": lambda level, m: m._replace(clip=False),
    "sampling rate 8x the accounted one": lambda level, m: m._replace(sampling_rate=min(1.0, 8 * m.sampling_rate)),
}


def _audited(overrides: dict, tamper=None, **more) -> dict:
    (result,) = audit(tiny_config(**{**overrides, **more}), CANARIES, tamper).values()
    return result


@pytest.mark.parametrize("broken", list(BROKEN))
def test_record_level_audit_catches_a_broken_mechanism(broken):
    result = _audited(RECORD, BROKEN[broken])
    assert result["epsilon_accounted"] == pytest.approx(1.0, rel=1e-3)
    assert result["epsilon_lower_bound"] > result["epsilon_accounted"], result["epsilon_lower_bound"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_record_level_bound_never_exceeds_the_accounted_epsilon(seed):
    result = _audited(RECORD, seed=seed, **{"privacy.target_epsilon": 6})
    assert 0.0 < result["epsilon_lower_bound"] <= result["epsilon_accounted"] <= 6.0 * (1 + 1e-9)
    assert result["confidence"] == 0.95 and len(result["scores"]) == len(result["included"]) == CANARIES


@pytest.mark.parametrize("variant", [{"federation.method": "ffa"}, {"privacy.per_layer_clipping": "true"}])
def test_frozen_factors_and_per_layer_clipping_are_audited_as_built(variant):
    """FFA-LoRA's frozen A gets no canary (nor noise); per-layer clipping keeps the whole norm <= C."""
    built = _audited(RECORD, **variant, **{"privacy.target_epsilon": 6})
    assert 0.0 < built["epsilon_lower_bound"] <= built["epsilon_accounted"]
    unclipped = _audited(RECORD, BROKEN["clipping off"], **variant)
    assert unclipped["epsilon_lower_bound"] > unclipped["epsilon_accounted"]


def test_user_level_audit_catches_missing_noise_and_not_the_mechanism_as_built():
    broken = _audited(USER, BROKEN["noise off"])
    assert broken["epsilon_lower_bound"] > broken["epsilon_accounted"]
    for seed in (0, 1):
        built = _audited(USER, seed=seed, **{"privacy.user_target_epsilon": 8})
        assert built["epsilon_lower_bound"] <= built["epsilon_accounted"]
        assert all(-1.0 <= s <= 1.0 for s in built["scores"])


def test_canary_directions_are_orthonormal_and_respect_the_mask():
    template = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}
    directions = canary_directions(jax.random.key(0), 10, template, {"a": 0.0, "b": 1.0})
    assert float(jnp.abs(directions["a"]).max()) == 0.0
    b = np.asarray(directions["b"])  # 10 canaries in 5 coordinates: unit vectors, not orthogonal
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    flat = canary_directions(jax.random.key(1), 6, template)
    rows = np.concatenate([np.asarray(x).reshape(6, -1) for x in flat.values()], axis=1)  # [6, 17]
    gram = rows @ rows.T
    np.testing.assert_allclose(gram, np.eye(6), atol=1e-5)


def test_without_noise_scores_count_the_steps_a_canary_was_sampled():
    """Noise off, q = 1: every in-canary contributes C per step (clipped from 10 C), out-canaries 0."""
    directions = canary_directions(jax.random.key(0), 8, {"w": jnp.zeros((16,))})
    included = canary_inclusion(jax.random.key(1), 8)
    scores = record_level_scores(jax.random.key(2), directions, included, Mechanism(2.0, 0.0, 1.0, 7), 20.0)
    np.testing.assert_allclose(scores, 7.0 * included, atol=1e-4)


def test_perfect_separation_reaches_the_largest_certifiable_bound():
    included = canary_inclusion(jax.random.key(0), 200)
    perfect = largest_certifiable(included, 1e-5)
    assert epsilon_lower_bound(np.where(included, 5.0, 0.0), included, 1e-5) == pytest.approx(perfect)
    assert 0.0 < perfect < largest_certifiable(canary_inclusion(jax.random.key(0), 1000), 1e-5)


@pytest.mark.parametrize("extra, expected", [
    ([], "audit needs privacy.record_level or privacy.user_level to be true"),
    (["--set", "privacy.record_level=true", "--set", "privacy.sampling=shuffle", "--set", "privacy.target_epsilon=8"],
     "audit needs privacy.sampling=poisson"),
    (["--set", "privacy.record_level=true", "--set", "privacy.target_epsilon=8", "--canaries", "1"],
     "--canaries must be at least 2, got 1"),
])
def test_bad_audit_input_is_one_line_and_writes_nothing(extra, expected, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedlora-jax: error: {expected}"), err
    assert not out.exists()


def test_audit_refuses_a_non_empty_output_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["audit", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path),
                 "--set", "privacy.record_level=true", "--set", "privacy.target_epsilon=8"]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_quickstart_audit_in_a_fresh_process(tmp_path):
    """The issue's command: a bound above 0 and at most the accounted epsilon 8."""
    out = tmp_path / "audit"
    proc = subprocess.run([sys.executable, "-m", "fedlora_jax", "audit", "configs/quickstart.yaml",
                           "--set", "privacy.record_level=true", "--set", "privacy.target_epsilon=8",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "audit.json").read_text())["record_level"]
    assert 0.0 < record["epsilon_lower_bound"] <= record["epsilon_accounted"] <= 8.0 * (1 + 1e-9)
    assert record["canaries"] == 1000 and sum(record["included"]) == record["canaries_in"]
    assert (out / "canary_scores.png").stat().st_size > 0 and "eps lower bound" in proc.stdout

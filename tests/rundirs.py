"""Reading run directories back in tests: metrics without timings, checkpoints, final states."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def metrics_without_timings(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records, every field but the ``*_s`` timings."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted((run_dir / "checkpoints").glob("round_*"))


def final_state(run_dir: Path) -> dict:
    """The newest checkpoint's state, name -> array."""
    return load_file(str(checkpoints(run_dir)[-1] / "state.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same metrics (all but timings), same divergence log, bit-identical final state."""
    assert metrics_without_timings(run_dir) == metrics_without_timings(reference)
    assert (run_dir / "divergence.jsonl").read_text() == (reference / "divergence.jsonl").read_text()
    got, want = final_state(run_dir), final_state(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

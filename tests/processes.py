"""Fresh `fedlora-jax` processes in tests: a user's environment, and a run killed mid-way; and
Ctrl-C pressed in an in-process run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def user_env() -> dict:
    """This environment as a user's shell has it: nothing fixes JAX's device count."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    return env


def kill_after_first_checkpoint(run_args: list[str], run_dir: Path, env: dict | None = None) -> None:
    """Starts ``fedlora-jax run RUN_ARGS`` (writing ``run_dir``) and kills it with SIGKILL once
    round 2's checkpoint is written."""
    process = subprocess.Popen([sys.executable, "-m", "fedlora_jax", "run", *run_args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round_000002").exists():
            assert process.poll() is None, (
                f"the run ended before its first checkpoint:\n{process.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def press_ctrl_c_in_round(monkeypatch, round_number: int) -> None:
    """Makes in-process runs send themselves SIGINT (Ctrl-C) once round ``round_number`` is shown."""
    from fedlora_jax.run.report import RoundProgress

    advance = RoundProgress.advance

    def advance_then_press(self, record):
        advance(self, record)
        if record["round"] == round_number:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RoundProgress, "advance", advance_then_press)

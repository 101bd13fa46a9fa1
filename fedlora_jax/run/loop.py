"""The run loop: rounds, evaluation, logging, checkpoints, privacy budgets and Ctrl-C.

Python runs only between rounds. Everything that can fail on bad input (config, data, model) is
built (:func:`fedlora_jax.run.build.build_experiment`) before the run directory is created, so a
bad run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from fedlora_jax.config import Config, ConfigError
from fedlora_jax.engine import ClientShards, Federation, ServerState, device_shards, init_server_state
from fedlora_jax.eval.evaluation import Evaluation
from fedlora_jax.params import leaf_names
from fedlora_jax.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedlora_jax.run.build import Experiment, build_experiment
from fedlora_jax.run.checkpoint import Checkpointer, config_digest
from fedlora_jax.run.distributed import is_primary
from fedlora_jax.run.report import RoundProgress, summarise, summary_table
from fedlora_jax.run.rundir import RunLog
from fedlora_jax.run.sinks import check_sinks, open_sinks
from fedlora_jax.tasks import task_kind


@dataclasses.dataclass
class RunResult:
    history: list[dict]
    state: ServerState
    experiment: Experiment
    out_dir: Path | None
    compile_s: float
    diverged: str | None = None  # why the run stopped on a non-finite value, if it did
    interrupted: bool = False  # Ctrl-C stopped it (after a round, with a checkpoint)


def run(config: Config, out_dir: str | Path | None = None, progress: bool = True,
        console: Console | None = None, experiment: Experiment | None = None, resume: bool = False) -> RunResult:
    """Runs a federated simulation; writes the run directory when ``out_dir`` is given.

    With ``resume`` the run directory must hold an earlier run of ``config``: it continues from
    the newest usable checkpoint. Ctrl-C stops after the current round with a checkpoint. In a
    multi-process run every process calls this; process 0 alone writes and shows progress.
    """
    exp = experiment or build_experiment(config)
    console = console or Console(stderr=True)
    fed, rounds = exp.federation, config.federation.rounds
    primary = is_primary()
    progress = progress and primary
    out_path = Path(out_dir) if out_dir is not None else None
    sinks_wanted = sink_options(config) if primary else {"tensorboard": False, "wandb": None, "mlflow": None}
    check_sinks(**sinks_wanted, run_dir=out_path)  # before the run directory is written
    log = RunLog(out_path, config, resume, writes=primary)
    checkpoints = (Checkpointer(log.dir, config_digest(config.to_dict()), config.checkpoint.keep,
                                fed.method.modifies_base, {"task": exp.data.task, "num_labels": exp.data.num_labels})
                   if log.dir is not None else None)
    shards: ClientShards = fed.replicated(device_shards(exp.data))
    state = init_server_state(exp.params, exp.frozen, config.seed, fed)  # placed on the mesh
    history: list[dict] = []
    if resume:
        state, history = restore(checkpoints, state, exp.ledger, log, console if primary else Console(quiet=True))
        state = fed.placed(state)
    compiled, compile_s = compile_round(fed, state, shards)
    evaluation = exp.evaluation()
    headline = task_kind(exp.data.task).headline
    stopped = diverged = None
    with open_sinks(**sinks_wanted, run_dir=log.dir, run_name=config.name, config=config.to_dict()) as sinks:
        with RoundProgress(console, progress, f"{config.name} [{fed.method.name}]", rounds, len(history), compile_s,
                           headline) as bar, InterruptFlag() as interrupted:
            for r in range(len(history), rounds):
                stopped = budget_stop(exp.ledger, fed, state)
                if stopped:
                    break
                state, record, diverged = play_round(exp, compiled, state, shards, evaluation, r, headline)
                if diverged:
                    break
                history.append(record)
                log.round(record)
                sinks.round(record)
                bar.advance(record)
                if checkpoints and primary and config.checkpoint.every and (r + 1) % config.checkpoint.every == 0:
                    checkpoints.save(state, exp.ledger.participations, exp.ledger.rounds_done)
                if interrupted():
                    stopped = (
                        f"interrupted after round {r + 1}; continue with: fedlora-jax resume {log.dir or 'RUN_DIR'}"
                    )
                    break
        for message, style in ((stopped, "yellow"), (diverged, "red")):
            if message and primary:
                console.print(f"[{style}]{message}[/{style}]", soft_wrap=True)
        if checkpoints and primary:  # the state the run ends with (the last good one after a divergence)
            checkpoints.save(state, exp.ledger.participations, exp.ledger.rounds_done)
        summary = summarise(history, headline, compile_s, exp.ledger, stopped, diverged)
        summary["devices"] = f"{fed.devices} x {jax.default_backend()}"  # the mesh the rounds ran on
        log.write("summary.json", summary)
        sinks.summary(summary)
    if progress:
        console.print(summary_table(summary, title=f"{config.name}: {fed.method.name}, {rounds} rounds"))
    return RunResult(history, state, exp, log.dir, compile_s, diverged, interrupted())


def sink_options(config: Config) -> dict:
    """The logging sinks of ``config.log`` as :func:`fedlora_jax.run.sinks.open_sinks` takes them."""
    c = config.log
    mlflow = None if c.mlflow is None else {k: v for k, v in c.mlflow.model_dump().items() if v is not None}
    return {"tensorboard": c.tensorboard, "wandb": c.wandb, "mlflow": mlflow}


def play_round(exp: Experiment, compiled, state: ServerState, shards: ClientShards, evaluation: "Evaluation",
               r: int, headline: str) -> tuple[ServerState, dict, str | None]:
    """Round r (0-based): (the new state, its metrics record with the per-module divergence
    under ``"modules"``, None), or (the last good state, {}, why it diverged)."""
    fed, config = exp.federation, exp.config
    evaluate = (r + 1) % config.eval.every == 0 or r + 1 == config.federation.rounds
    # clients trained on the base before the round; FedEx and FLoRA rewrite it (and the round
    # consumes the old buffers), so their local evaluation needs a copy
    base_before = (jax.tree.map(jnp.copy, state.frozen)
                   if evaluate and config.eval.local and fed.method.modifies_base else None)
    t_round = time.perf_counter()
    state, out = compiled(state, shards)
    train_loss, wall_s = float(out.train_loss), time.perf_counter() - t_round
    cohort, taking_part = np.asarray(out.cohort), np.asarray(out.cohort_mask)
    privacy = exp.ledger.commit(cohort[taking_part])  # the round ran: its privacy cost is spent
    diverged = non_finite(np.asarray(out.finite), state, fed.method.modifies_base, r)
    if diverged:
        return state, {}, diverged
    record = round_record(exp, state, out, r, train_loss, wall_s, privacy)
    if evaluate:
        client_base = state.frozen if base_before is None else base_before
        record.update(evaluation.metrics(state, client_base, out.client_params, cohort, taking_part, headline))
    record["modules"] = dict(zip([m.name for m in fed.layout.modules], map(float, np.asarray(out.divergence))))
    return state, record, None


def compile_round(fed: Federation, state: ServerState, shards: ClientShards):
    """(the compiled round, seconds it took to compile)."""
    t0 = time.perf_counter()
    compiled = fed.compile_round(template=state).lower(state, shards).compile()
    return compiled, time.perf_counter() - t0


def restore(checkpoints: Checkpointer, template: ServerState, ledger: PrivacyLedger, log: RunLog,
            console: Console) -> tuple[ServerState, list[dict]]:
    """The newest usable checkpoint's state; the ledger set to it; the logged rounds after it
    removed from the run directory (they run again). Returns (state, history so far)."""
    found = checkpoints.latest(template, lambda message: console.print(f"[yellow]{message}[/yellow]", soft_wrap=True))
    if found is None:
        raise ConfigError(f"run directory {log.dir} has no usable checkpoint to resume from")
    ledger.participations[:] = found.participations
    ledger.rounds_done = found.rounds_spent
    history = log.truncate(found.round)
    console.print(f"resuming {log.dir} after round {found.round} ({found.path.name})", soft_wrap=True)
    return found.state, history


def budget_stop(ledger: PrivacyLedger, fed: Federation, state: ServerState) -> str | None:
    """Why the next round must not run (its privacy cost would exceed a target), or None."""
    if not ledger.active:
        return None
    try:
        ledger.check(fed.next_cohort(state))
    except BudgetExceeded as e:
        return str(e)
    return None


def round_record(exp: Experiment, state: ServerState, out, r: int, train_loss: float, wall_s: float,
                 privacy: dict) -> dict:
    """The metrics.jsonl record of round r (0-based) before evaluation."""
    fed, taking_part, reported = exp.federation, np.asarray(out.cohort_mask), np.asarray(out.reported)
    bytes_up, bytes_down = fed.communication_bytes(state.params, state.frozen, r, int(taking_part.sum()),
                                                   int(reported.sum()))
    divergence = np.asarray(out.divergence)
    record = {
        "round": r + 1,
        "train_loss": train_loss,
        "divergence": float(divergence.mean()) if divergence.size else 0.0,
        "wall_s": wall_s,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
    }
    if fed.cohort.sampling_rate is not None:
        record.update(cohort_size=int(taking_part.sum()), cohort_overflow=bool(out.cohort_overflow))
    if fed.dropout:
        record["reported"] = int(reported.sum())  # 0: no upload arrived and the global state was kept
    record.update(privacy)
    dp = fed.trainer.dp
    if dp is not None:
        record["dp_non_finite_examples"] = int(out.dp_non_finite)
        if dp.poisson:
            record["dp_buffer_overflows"] = int(out.dp_overflows)
    return record


class InterruptFlag:
    """Within the block, the first Ctrl-C (SIGINT) only sets a flag, read by calling the object;
    a second one interrupts as usual. Outside the main thread it never fires."""

    def __init__(self):
        self.fired, self.previous = False, None

    def __enter__(self) -> "InterruptFlag":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.fired:
            raise KeyboardInterrupt
        self.fired = True

    def __call__(self) -> bool:
        return self.fired

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def non_finite(finite: np.ndarray, state: ServerState, check_frozen: bool, r: int) -> str | None:
    """The divergence message of round r (0-based) from the round's finite flags (the training
    loss, then each trainable leaf, then each frozen leaf when the method writes the base), or None."""
    if finite.all():
        return None
    names = (["the training loss"] + [f"trainable parameter {n}" for n in leaf_names(state.params)]
             + ([f"frozen parameter {n}" for n in leaf_names(state.frozen)] if check_frozen else []))
    what = names[int(np.argmin(finite))]
    return (f"round {r + 1}: {what} is not finite (NaN or inf); the run stopped and keeps the state "
            f"after round {r}")

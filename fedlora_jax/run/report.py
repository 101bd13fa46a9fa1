"""What a run shows and keeps: its progress bar, and the summary of its rounds."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedlora_jax.privacy.ledger import PrivacyLedger


class RoundProgress:
    """The progress bar of a run (disabled when ``progress`` is False)."""

    def __init__(self, console: Console, progress: bool, description: str, rounds: int, done: int,
                 compile_s: float, headline: str):
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        self.bar = Progress(*columns, console=console, disable=not progress, transient=False)
        self.task = self.bar.add_task(description, total=rounds, completed=done, status="compiled in %.1fs" % compile_s)
        self.headline = headline

    def __enter__(self) -> "RoundProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, record: dict) -> None:
        status = f"loss {record['train_loss']:.4f}"
        if f"global_{self.headline}" in record:
            status += f"  {self.headline} {record[f'global_{self.headline}']:.4f}"
        if record.get("reported") == 0:
            self.bar.console.print(f"[yellow]round {record['round']}: no client's upload arrived "
                                   "(federation.dropout); the global state is kept[/yellow]", soft_wrap=True)
        self.bar.update(self.task, advance=1, status=status)


def summarise(history: list[dict], headline: str, compile_s: float, ledger: PrivacyLedger | None = None,
              stopped: str | None = None, diverged: str | None = None) -> dict:
    """Final and best values of the evaluated metrics, totals of bytes and time; the noise that
    ran, why the run stopped early and, after a divergence, the privacy spent (the discarded
    round ran and counts)."""
    out = summarise_history(history, headline, compile_s)
    if ledger is not None:
        out.update({k: v for k, v in (("noise_multiplier", ledger.noise_multiplier),
                                      ("user_noise_multiplier", ledger.user_noise_multiplier)) if v is not None})
    if stopped:
        out["stopped"] = stopped
    if diverged:
        out["diverged"] = diverged
        if ledger is not None:
            out.update({f"spent_{k}": v for k, v in ledger.report().items()})
    return out


def summarise_history(history: list[dict], headline: str, compile_s: float) -> dict:
    """Final and best values of the evaluated metrics, totals of bytes and time."""
    if not history:
        return {"rounds": 0, "compile_s": compile_s}
    evaluated = [h for h in history if f"global_{headline}" in h]
    last = evaluated[-1] if evaluated else history[-1]
    out = {"rounds": len(history), "final_train_loss": history[-1]["train_loss"]}
    for key in sorted(k for k in last if k.startswith(("global_", "local_"))):
        out[f"final_{key}"] = last[key]
    if evaluated:
        out[f"best_global_{headline}"] = max(h[f"global_{headline}"] for h in evaluated)
    for key in ("epsilon", "delta", "user_epsilon", "user_delta"):
        if key in history[-1]:
            out[f"final_{key}"] = history[-1][key]
    out["total_bytes_up"] = int(sum(h["bytes_up"] for h in history))
    out["total_bytes_down"] = int(sum(h["bytes_down"] for h in history))
    out["mean_divergence"] = float(np.mean([h["divergence"] for h in history]))
    out["compile_s"] = compile_s
    out["train_s"] = float(sum(h["wall_s"] for h in history))
    return out


def summary_table(summary: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:,}" if isinstance(v, int) else v if isinstance(v, str) else f"{v:.4f}")
    return table

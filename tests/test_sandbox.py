"""The sandbox for untrusted code (:mod:`fedlora_jax.eval.sandbox`) and HumanEval scoring
(:mod:`fedlora_jax.eval.humaneval`): canonical solutions pass, hostile programs are stopped and
scored as failures, the parent's environment stays unseen."""

from __future__ import annotations

import gzip
import json
import time

import pytest

from fedlora_jax.eval.humaneval import (evaluate_completions, load_problems, pass_at_k, program,
                                        truncate_completion)
from fedlora_jax.eval.sandbox import Limits, run_program, run_programs

LIMITS = Limits(timeout_s=3.0, cpu_s=2, memory_bytes=512 << 20, file_bytes=1 << 20)


def test_a_normal_program_passes_and_an_exception_fails():
    assert run_program("x = sum(range(10))\nassert x == 45\n", LIMITS).passed
    outcome = run_program("assert 1 == 2, 'wrong'\n", LIMITS)
    assert (outcome.passed, outcome.status) == (False, "failed") and "AssertionError: wrong" in outcome.error


def test_infinite_loop_is_stopped():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", LIMITS)
    assert not outcome.passed and outcome.status in ("timeout", "killed")
    assert time.monotonic() - start < LIMITS.timeout_s + 2


def test_memory_bomb_is_stopped():
    outcome = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n", LIMITS)
    assert not outcome.passed and outcome.status in ("failed", "killed")


def test_fork_bomb_is_stopped():
    outcome = run_program("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert not outcome.passed
    outcome = run_program("import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '100'])\n", LIMITS)
    assert not outcome.passed


def test_huge_write_is_stopped_and_cleaned_up():
    source = "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n"
    outcome = run_program(source, LIMITS)
    assert not outcome.passed and outcome.status in ("failed", "killed")


def test_the_run_goes_on_after_hostile_programs():
    sources = ["while True:\n    pass\n", "x = ' ' * (1 << 40)\n", "pass\n"]
    outcomes = run_programs(sources, LIMITS, workers=2)
    assert [o.passed for o in outcomes] == [False, False, True]


def test_parent_environment_is_invisible(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDLORA_TEST_SECRET", "hunter2")
    assert run_program("import os\nassert 'FEDLORA_TEST_SECRET' not in os.environ\n", LIMITS).passed
    assert not run_program("import os\nassert os.environ.get('FEDLORA_TEST_SECRET') == 'hunter2'\n", LIMITS).passed
    outcome = run_program(f"import os\nassert os.getcwd() != {str(tmp_path)!r} and os.listdir('.') == []\n", LIMITS)
    assert outcome.passed


def test_pass_at_k_matches_its_definition():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_truncation_keeps_the_function_body():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def test_canonical_solutions_pass_every_humaneval_problem():
    problems = load_problems()
    assert len(problems) == 164
    start = time.monotonic()
    scores, outcomes = evaluate_completions(problems, {p.task_id: [p.canonical_solution] for p in problems},
                                            limits=Limits(timeout_s=20.0, cpu_s=20), workers=2)
    failed = [task for task, o in outcomes.items() if not o[0].passed]
    assert failed == [] and scores == {"pass@1": 1.0}, (failed, [outcomes[t][0] for t in failed[:3]])
    assert time.monotonic() - start < 90


def test_wrong_completions_fail_and_a_jsonl_file_loads(tmp_path):
    problems = load_problems()[:4]
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(vars(p)) + "\n" for p in problems)
    assert load_problems(path) == problems
    completions = {p.task_id: [p.canonical_solution, "    return None\n"] for p in problems}
    scores, _ = evaluate_completions(problems, completions, ks=(1, 2), limits=LIMITS, workers=2)
    assert scores == {"pass@1": pytest.approx(0.5), "pass@2": 1.0}
    assert program(problems[0], "X").startswith(problems[0].prompt + "X")


def test_model_pass_at_k_runs_generated_completions(monkeypatch):
    from fedlora_jax.eval import generate, humaneval

    problems = load_problems()[:3]
    seen = {}

    def fake_generate_texts(graphdef, params, frozen, tokenizer, prompts, *args):
        seen["prompts"], seen["args"] = prompts, args
        # sample 0 of each problem: its solution then a stray def (truncated away); sample 1: wrong
        by_prompt = {p.prompt: p.canonical_solution for p in problems}
        return [by_prompt[p] + "\ndef junk(:\n" if i % 2 == 0 else "    return None\n" for i, p in enumerate(prompts)]

    monkeypatch.setattr(generate, "generate_texts", fake_generate_texts)
    scores, outcomes = humaneval.humaneval_pass_at_k(None, None, None, None, problems, samples=2, ks=(1, 2),
                                                     temperature=0.8, limits=LIMITS, workers=2)
    assert seen["prompts"] == [p.prompt for p in problems for _ in range(2)]
    assert scores == {"pass@1": pytest.approx(0.5), "pass@2": 1.0}
    with pytest.raises(ValueError, match="needs temperature > 0"):
        humaneval.humaneval_pass_at_k(None, None, None, None, problems, samples=2)

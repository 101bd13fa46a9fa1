"""SmolLM2 from its packaged GGUF end to end: chat-template prompts as transformers renders them,
and ``configs/smollm2_gsm8k.yaml`` run through the CLI with tiny overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fedlora_jax.cli import main
from fedlora_jax.data.chat import apply_chat_template, chat_template_of
from test_gguf import SMOLLM2, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.usefixtures("shared_data")  # fails, never skips, when ../shared/data is absent
TINY_RUN = ["federation.rounds=1", "federation.local_steps=1", "federation.batch_size=2",
            "data.max_train_examples=8", "data.max_test_examples=2", "data.max_length=96",
            "eval.generate_examples=1", "eval.max_new_tokens=4", "eval.max_prompt_length=96", "eval.batch_size=2"]


def test_chat_prompts_match_transformers():
    template = chat_template_of(SMOLLM2)
    assert template is not None and "<|im_start|>" in template
    questions = ["What is 2 + 3?", "Natalia sold clips to 48 of her friends."]
    hf = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    expected = [hf.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                for q in questions]
    assert apply_chat_template(template, questions) == expected
    assert expected[0].endswith("<|im_start|>assistant\n")


@needs_data
def test_smollm2_gsm8k_config_runs(tmp_path):
    out = tmp_path / "run"
    overrides = [arg for item in TINY_RUN for arg in ("--set", item)]
    assert main(["run", str(ROOT / "configs/smollm2_gsm8k.yaml"), "--out", str(out), "--quiet", *overrides]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # real weights: the answer loss starts far below a random model's ln(49152) ~ 10.8
    assert metrics[-1]["train_loss"] < 4.0 and 0.0 <= metrics[-1]["global_exact_match"] <= 1.0


def test_gguf_of_another_architecture_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, architecture="gpt2")
    code = main(["run", str(ROOT / "configs/smollm2_gsm8k.yaml"), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f"model.pretrained={path}", "--set", f"data.tokenizer={SMOLLM2}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and error[-1] == "fedlora-jax: error: GGUF architecture 'gpt2' is not supported (supported: llama)"

"""Code SFT data (:mod:`fedlora_jax.data.code`): prompt/completion jsonl -> federated causal-LM
shards with the loss on completion tokens only."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fedlora_jax.config import DataConfig
from fedlora_jax.data.code import load_code_sft
from fedlora_jax.data.sources import load_federated

ROWS = [{"prompt": "def f ( x ) :", "completion": "return x"},
        {"prompt": "def g ( ) :", "completion": "return 1"},
        {"prompt": "def h ( y ) :", "completion": "pass"},
        {"prompt": "def k ( ) :", "completion": "return k"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def tokenizer_file(tmp_path) -> str:
    words = sorted({w for r in ROWS for w in (r["prompt"] + " " + r["completion"]).split()})
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[PAD]", "[EOS]", *words])}, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def test_code_source_from_a_local_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    settings = DataConfig(source="code", load={"dir": str(tmp_path)}, num_clients=2, max_length=8,
                          eos_token="[EOS]", test_split="test", cache_dir=str(tmp_path / "cache"))
    data = load_federated(settings, tokenizer_file(tmp_path), 0)
    assert data.task == "causal_lm" and data.train["input_ids"].shape == (4, 8)
    tokenizer = Tokenizer.from_file(tokenizer_file(tmp_path))
    for ids, loss in zip(data.train["input_ids"], data.train["loss_mask"]):
        trained = [tokenizer.id_to_token(int(t)) for t, m in zip(ids, loss) if m]
        assert trained[-1] == "[EOS]" and trained[0] in ("return", "pass") and "def" not in trained


def test_code_source_columns_and_hub(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "solution": "s"}])
    splits = load_code_sft(files={"train": str(tmp_path / "a.jsonl")}, prompt_column="question",
                           completion_column="solution")
    assert (splits["train"].prompts, splits["train"].answers) == (["q"], ["s"])
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_code_sft(files={"train": str(tmp_path / "a.jsonl")})
    with pytest.raises(ValueError, match="exactly one of"):
        load_code_sft(dir=str(tmp_path), hub="x/y")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name: {"train": {"prompt": ["p"], "completion": [name]}}))
    assert load_code_sft(hub="org/code-sft")["train"].answers == ["org/code-sft"]

"""Real data sources to federated shards: load -> tokenise (cached) -> partition -> local tests.

Sources (``data.source`` in a config): ``glue`` (a GLUE task from a local GLUE-layout folder or
the hub), ``files`` (JSON lines / CSV / TSV / parquet with named columns), ``gsm8k``
(causal LM on question/answer pairs, loss on answer tokens only) and ``code`` (causal LM on
prompt/completion pairs, loss on the completion only). ``data.load`` holds the
loader's own options (see :func:`fedlora_jax.data.text.load_text_dataset`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import dataclasses

from fedlora_jax.data.base import FederatedData, GenerationTask, federate
from fedlora_jax.data.partition import partition, split_local_test
from fedlora_jax.data.chat import apply_chat_template, chat_template_of
from fedlora_jax.data.code import CodeSplit, load_code_sft
from fedlora_jax.data.gsm8k import GSM8KSplit, load_gsm8k
from fedlora_jax.data.text import GLUE_TASKS, TextSplit, glue_task, load_files, load_glue_hub, load_glue_local
from fedlora_jax.data.tokenise import tokenize_prompt_answer, tokenize_texts

SOURCES = ("synthetic", "glue", "files", "gsm8k", "code")
_PROMPTED = (GSM8KSplit, CodeSplit)  # causal LM splits of prompts and the answers trained on


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fedlora_jax" / "tokens"


def _subsample(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _size(split) -> int:
    return len(split.prompts) if isinstance(split, _PROMPTED) else len(split.labels)


def _pick(split, index: np.ndarray):
    if isinstance(split, CodeSplit):
        return CodeSplit([split.prompts[i] for i in index], [split.answers[i] for i in index])
    if isinstance(split, GSM8KSplit):
        return GSM8KSplit([split.prompts[i] for i in index], [split.answers[i] for i in index],
                          [split.final_answers[i] for i in index])
    texts_b = None if split.texts_b is None else [split.texts_b[i] for i in index]
    return TextSplit([split.texts_a[i] for i in index], texts_b, split.labels[index])


def _tokenise(split, tokenizer, max_length: int, cache_dir, eos_token: str | None) -> dict[str, np.ndarray]:
    if isinstance(split, _PROMPTED):
        return tokenize_prompt_answer(tokenizer, split.prompts, split.answers, max_length, eos_token, cache_dir)
    arrays = tokenize_texts(tokenizer, split.texts_a, split.texts_b, max_length, cache_dir=cache_dir)
    arrays["labels"] = split.labels.astype(np.float32 if split.labels.dtype.kind == "f" else np.int32)
    return arrays


def load_federated(settings, tokenizer, seed: int) -> FederatedData:
    """Loads, tokenises and partitions a real data set into client shards.

    Args:
      settings: the data settings (the config's ``data`` section, or any object with these fields):
        source (``glue``, ``files``, ``gsm8k`` or ``code``); load (loader options: ``task``/
        ``dir``/``root``/``hub`` for glue; ``files``, columns...; for gsm8k/code ``chat: true``
        puts each prompt in a user turn of the tokenizer's chat template); num_clients (U);
        partition (``{"scheme": name, **scheme options}``, default iid); max_length (L, tokens
        per training example: client train and local test shards); train_split / test_split (the
        test split is the global test set); local_test_fraction (each client's share held out as its local test split);
        max_train_examples / max_test_examples (optional random subsets); cache_dir (tokenisation
        cache, default ~/.cache/fedlora_jax/tokens); eos_token (causal LM: token appended to every
        answer and trained on, so generation learns to stop); test_max_length (tokens per global
        test example, default max_length: SST-2's train phrases are short, 95% <= 33 MiniLM
        tokens, but its dev sentences reach 55, so training at 32 and testing at 64 spares padding
        every phrase to the dev length).
      tokenizer: a tokenizer directory, tokenizer.json or hub id.
      seed: seeds subsampling, partitioning and local test splits.
    """
    source, load, num_clients = settings.source, settings.load, settings.num_clients
    train_split, test_split, max_length = settings.train_split, settings.test_split, settings.max_length
    eos_token, test_max_length = settings.eos_token, settings.test_max_length
    if source not in SOURCES[1:]:
        raise ValueError(f"unknown data source {source!r} (known: {', '.join(SOURCES)})")
    load = dict(load)
    chat = load.pop("chat", False) if source in ("gsm8k", "code") else False
    splits = load_text_dataset({"kind": source, **load})
    if chat:
        splits = _chat_prompts(splits, tokenizer)
    for name in (train_split, test_split):
        if name not in splits:
            raise ValueError(f"data split {name!r} not loaded (available: {', '.join(splits)})")
    rng = np.random.default_rng(seed)
    train = _pick(splits[train_split], _subsample(_size(splits[train_split]), settings.max_train_examples, rng))
    test = _pick(splits[test_split], _subsample(_size(splits[test_split]), settings.max_test_examples, rng))
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    train_arrays = _tokenise(train, tokenizer, max_length, cache_dir, eos_token)
    test_length = max_length if test_max_length is None else test_max_length
    test_arrays = _tokenise(test, tokenizer, test_length, cache_dir, eos_token)

    options = dict(settings.partition or {"scheme": "iid"})
    scheme = options.pop("scheme", "iid")
    if source in ("gsm8k", "code"):
        task, num_labels, label_names, name = "causal_lm", 0, None, source
        labels_for_partition = np.zeros(len(train.answers), np.int64)
    else:
        info = GLUE_TASKS.get(load.get("task")) if source == "glue" else None
        regression = train.labels.dtype.kind == "f"
        task = "regression" if regression else "classification"
        label_names = list(info.label_names) if info and info.label_names else load.get("label_names")
        num_labels = 1 if regression else (len(label_names) if label_names else int(train.labels.max()) + 1)
        name = load.get("task", "files") if source == "glue" else "files"
        labels_for_partition = train.labels if not regression else np.zeros(len(train.labels), np.int64)
    parts = partition(labels_for_partition, num_clients, scheme, seed, **options)
    train_parts, test_parts = split_local_test(parts, settings.local_test_fraction, seed + 1)
    data = federate(train_arrays, train_parts, test_parts, test_arrays, task, num_labels, name, label_names)
    if source == "gsm8k":
        generation = GenerationTask(test.prompts, test.final_answers, str(tokenizer), eos_token)
        data = dataclasses.replace(data, generation=generation)
    return data


def _chat_prompts(splits: dict, tokenizer) -> dict:
    """Every prompt as one user turn of the tokenizer's chat template (``load.chat: true``)."""
    template = chat_template_of(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
    if template is None:
        raise ValueError(f"data.load.chat is set but tokenizer {tokenizer} has no chat template")
    return {name: dataclasses.replace(split, prompts=apply_chat_template(template, split.prompts))
            for name, split in splits.items()}


def load_text_dataset(source: Mapping[str, Any]) -> dict[str, TextSplit | GSM8KSplit]:
    """Reads the data set a config's ``source`` dict describes (see the module docstring).

    Args:
      source: ``{"kind": "glue" | "files" | "gsm8k" | "code", ...}``. ``glue`` takes ``task`` and one of
        ``dir`` (the task folder), ``root`` (the GLUE folder holding task folders) or
        ``hub: True``, and optionally ``splits``. ``files`` takes ``files`` (split -> path),
        ``text_columns``, ``label_column`` and optionally ``format``, ``label_names``,
        ``label_map``, ``regression``. ``gsm8k`` takes ``files`` (split -> path) and optionally
        ``prompt_template``, ``answer_prefix``. ``code`` takes one of ``dir``, ``files``, ``hub``
        and optionally ``prompt_column``, ``completion_column`` (:mod:`fedlora_jax.data.code`).

    Returns:
      split name -> TextSplit (``glue``, ``files``) or GSM8KSplit (``gsm8k``).
    """
    options = dict(source)
    kind = options.pop("kind", None)
    allowed = {
        "glue": {"task", "dir", "root", "hub", "splits"},
        "files": {"files", "text_columns", "label_column", "format", "label_names", "label_map",
                  "regression"},
        "gsm8k": {"files", "prompt_template", "answer_prefix"},
        "code": {"dir", "files", "hub", "prompt_column", "completion_column"},
    }
    if kind not in allowed:
        raise ValueError(f"unknown data source kind {kind!r} (known: {', '.join(allowed)})")
    unknown = set(options) - allowed[kind]
    if unknown:
        raise ValueError(
            f"{kind} source: unknown option(s) {', '.join(sorted(unknown))} "
            f"(allowed: {', '.join(sorted(allowed[kind]))})"
        )
    if kind == "code":
        return load_code_sft(**options)
    if kind == "glue":
        if "task" not in options:
            raise ValueError("glue source needs 'task'")
        task, splits = options["task"], options.get("splits")
        places = [k for k in ("dir", "root", "hub") if options.get(k)]
        if len(places) != 1:
            raise ValueError("glue source needs exactly one of 'dir', 'root' or 'hub: true'")
        if places[0] == "hub":
            return load_glue_hub(task, splits)
        directory = options.get("dir") or Path(options["root"]) / glue_task(task).folder
        return load_glue_local(task, directory, splits)
    for key in ("files",) + (("text_columns", "label_column") if kind == "files" else ()):
        if key not in options:
            raise ValueError(f"{kind} source needs {key!r}")
    if kind == "files":
        return load_files(
            options["files"],
            options["text_columns"],
            options["label_column"],
            options.get("format"),
            options.get("label_names"),
            options.get("label_map"),
            options.get("regression", False),
        )
    extra = {k: options[k] for k in ("prompt_template", "answer_prefix") if k in options}
    return {split: load_gsm8k(path, **extra) for split, path in options["files"].items()}

"""Tokenisation to fixed-length int32 arrays with the ``tokenizers`` library, with a disk cache.

Every output has the static shape [N, max_length]: sequences are truncated (pairs longest-first)
and right-padded to exactly ``max_length``, whatever padding or truncation the tokenizer file
itself turns on. Results can be cached as ``.npz`` files keyed by a sha256 of the tokenizer (its
full serialised JSON), ``max_length``, the kind of encoding and the texts themselves, so a second
run on the same data skips tokenisation; the key covers the data files' content through the
texts read from them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

# Bumped whenever the cached arrays' meaning changes, so old cache files are never reused.
_CACHE_VERSION = "1"
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>")


def load_tokenizer(tokenizer_dir_or_id: str | os.PathLike | Tokenizer) -> Tokenizer:
    """Loads a ``tokenizers.Tokenizer`` with padding and truncation turned off.

    Args:
      tokenizer_dir_or_id: a ``Tokenizer`` (copied, never modified), a ``tokenizer.json`` file,
        a ``.gguf`` model file (its tokenizer metadata, converted by transformers),
        a folder holding one, a folder without one (read with ``transformers.AutoTokenizer``,
        e.g. from ``vocab.txt``), or a hub model id (AutoTokenizer; needs the network or cache).

    Returns:
      A fresh Tokenizer whose own padding and truncation are disabled.
    """
    return _prepare(tokenizer_dir_or_id)[0]


def _prepare(tokenizer_dir_or_id: str | os.PathLike | Tokenizer) -> tuple[Tokenizer, int]:
    """Loads a tokenizer (see :func:`load_tokenizer`) and the id it pads with.

    The pad id is the tokenizer file's own padding id, else a known pad token's id, else 0;
    padding positions are always masked, so the choice only matters for readability.
    """
    if isinstance(tokenizer_dir_or_id, Tokenizer):
        tokenizer = Tokenizer.from_str(tokenizer_dir_or_id.to_str())
    else:
        name = os.fspath(tokenizer_dir_or_id)
        path = Path(name).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":  # built from the GGUF metadata
            tokenizer = _from_transformers(str(path.parent), gguf_file=path.name)
        elif path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
        elif (path / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif path.is_dir() or not name.startswith((".", "/", "~")):
            tokenizer = _from_transformers(str(path) if path.is_dir() else name)
        else:
            raise ValueError(f"tokenizer path does not exist: {name}")
    pad_id = _pad_token_id(tokenizer)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, pad_id


def _from_transformers(name: str, **kwargs) -> Tokenizer:
    from transformers import AutoTokenizer  # deferred: slow import, only for this fallback

    hf_tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {name} has no fast (tokenizers) backend")
    return Tokenizer.from_str(backend.to_str())


def _pad_token_id(tokenizer: Tokenizer) -> int:
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for token in _PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def _hash_texts(digest, texts: Sequence[str] | None) -> None:
    if texts is None:
        digest.update(b"\x00none")
        return
    digest.update(f"\x00{len(texts)}".encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)


def cache_key(kind: str, tokenizer: Tokenizer, max_length: int, *text_lists) -> str:
    """sha256 hex digest of everything that determines a tokenisation result."""
    digest = hashlib.sha256()
    digest.update(f"{_CACHE_VERSION}\x00{kind}\x00{max_length}\x00".encode())
    digest.update(tokenizer.to_str().encode("utf-8"))
    for texts in text_lists:
        _hash_texts(digest, texts)
    return digest.hexdigest()


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as cached:
        return {name: cached[name] for name in cached.files}


def _save_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename, so concurrent runs never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _encode_batch(tokenizer: Tokenizer, inputs: list, add_special_tokens: bool = True) -> list:
    """The single place that runs the tokenizer (tests count calls to it)."""
    return tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")


def tokenize_texts(
    tokenizer_dir_or_id: str | os.PathLike | Tokenizer,
    texts_a: Sequence[str],
    texts_b: Sequence[str] | None = None,
    max_length: int = 128,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Tokenises single sentences or sentence pairs to fixed-length arrays.

    Args:
      tokenizer_dir_or_id: see :func:`load_tokenizer`.
      texts_a: N texts (first sentences of pairs).
      texts_b: N second sentences, or None for single sentences.
      max_length: L, the exact output length: longer inputs are truncated (pairs longest-first,
        special tokens kept), shorter ones right-padded.
      cache_dir: folder for cached results; None disables caching.

    Returns:
      ``input_ids``, ``attention_mask`` (1 on real tokens) and ``token_type_ids`` (0 for the
      first segment, 1 for the second), each int32 [N, L].
    """
    _check_max_length(max_length)
    if texts_b is not None and len(texts_b) != len(texts_a):
        raise ValueError(f"texts_b has {len(texts_b)} entries but texts_a has {len(texts_a)}")
    tokenizer, pad_id = _prepare(tokenizer_dir_or_id)
    path = None
    if cache_dir is not None:
        key = cache_key(f"texts\x00{pad_id}", tokenizer, max_length, texts_a, texts_b)
        path = Path(cache_dir) / f"tokens-{key[:40]}.npz"
        cached = _load_cached(path)
        if cached is not None:
            return cached
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    inputs = list(texts_a) if texts_b is None else list(zip(texts_a, texts_b))
    encodings = _encode_batch(tokenizer, inputs) if inputs else []
    n = len(encodings)
    arrays = {
        "input_ids": np.full((n, max_length), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((n, max_length), dtype=np.int32),
        "token_type_ids": np.zeros((n, max_length), dtype=np.int32),
    }
    for i, encoding in enumerate(encodings):
        length = len(encoding.ids)
        arrays["input_ids"][i, :length] = encoding.ids
        arrays["attention_mask"][i, :length] = 1
        arrays["token_type_ids"][i, :length] = encoding.type_ids
    if path is not None:
        _save_cached(path, arrays)
    return arrays


def tokenize_prompt_answer(
    tokenizer_dir_or_id: str | os.PathLike | Tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    max_length: int,
    eos_token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Tokenises prompt + answer pairs for causal-LM fine-tuning with a loss on the answer only.

    The prompt is encoded with the tokenizer's special tokens (e.g. a BOS), the answer without,
    then ``eos_token`` (if given) is appended, and the result is right-padded. When prompt +
    answer exceed ``max_length``, the answer keeps at least half the window (all of it if it is
    shorter) and the prompt is cut from the left (its start, with any BOS, is lost first); the
    end of a long answer is lost last. So every example has answer tokens to train on.

    Args:
      tokenizer_dir_or_id: see :func:`load_tokenizer`.
      prompts: N prompts.
      answers: N answers (include any separating whitespace, e.g. ``" " + answer``).
      max_length: L, the exact output length.
      eos_token: token appended after each answer (and trained on), or None.
      cache_dir: folder for cached results; None disables caching.

    Returns:
      ``input_ids``, ``attention_mask`` (1 on prompt and answer tokens) and ``loss_mask`` (1
      only on answer tokens, including the EOS), each int32 [N, L]. ``loss_mask[i, t] = 1``
      means token t is a target: the model's output at position t - 1 is scored on it.
    """
    _check_max_length(max_length)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    tokenizer, pad_id = _prepare(tokenizer_dir_or_id)
    eos = []
    if eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
        eos = [eos_id]
    path = None
    if cache_dir is not None:
        kind = f"prompt-answer-v2\x00{eos_token}\x00{pad_id}"
        key = cache_key(kind, tokenizer, max_length, prompts, answers)
        path = Path(cache_dir) / f"prompt-answer-{key[:40]}.npz"
        cached = _load_cached(path)
        if cached is not None:
            return cached
    prompt_encodings = _encode_batch(tokenizer, list(prompts)) if prompts else []
    answer_encodings = (
        _encode_batch(tokenizer, list(answers), add_special_tokens=False) if answers else []
    )
    n = len(prompt_encodings)
    arrays = {
        "input_ids": np.full((n, max_length), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((n, max_length), dtype=np.int32),
        "loss_mask": np.zeros((n, max_length), dtype=np.int32),
    }
    for i, (prompt, answer) in enumerate(zip(prompt_encodings, answer_encodings)):
        target = answer.ids + eos
        kept_target = min(len(target), max(max_length - len(prompt.ids), max_length // 2))
        prompt_ids = prompt.ids[max(0, len(prompt.ids) - (max_length - kept_target)):]
        ids = prompt_ids + target[:kept_target]
        length, prompt_length = len(ids), len(prompt_ids)
        arrays["input_ids"][i, :length] = ids
        arrays["attention_mask"][i, :length] = 1
        arrays["loss_mask"][i, prompt_length:length] = 1
    if path is not None:
        _save_cached(path, arrays)
    return arrays

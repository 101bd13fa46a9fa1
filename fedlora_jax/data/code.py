"""Code SFT data: prompt/completion pairs (loss on the completion only, as GSM8K's answers).

Rows come from JSON-lines files with ``prompt`` and ``completion`` fields (other column names
by option): ``dir`` (a folder of ``<split>.jsonl`` files), ``files`` (split -> path), or ``hub``
(a Hugging Face dataset name, read with ``datasets``; needs the network or its cache).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedlora_jax.data.text import _column, read_table


@dataclasses.dataclass(frozen=True)
class CodeSplit:
    """One split: N prompts and the N completions trained on (``answers``, as GSM8K's)."""

    prompts: list[str]
    answers: list[str]

    def __post_init__(self):
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"code split lengths differ: {len(self.prompts)} prompts, {len(self.answers)} completions")

    def __len__(self) -> int:
        return len(self.prompts)


def load_code_sft(dir: str | Path | None = None, files: dict[str, str] | None = None, hub: str | None = None,
                  prompt_column: str = "prompt", completion_column: str = "completion") -> dict[str, CodeSplit]:
    """split name -> CodeSplit from exactly one of ``dir``, ``files`` or ``hub`` (see the module
    docstring); ``ValueError`` naming the file of a missing column or an empty folder."""
    places = [name for name, value in (("dir", dir), ("files", files), ("hub", hub)) if value]
    if len(places) != 1:
        raise ValueError("code source needs exactly one of 'dir', 'files' or 'hub'")
    if hub:
        import datasets  # deferred: slow import, only for hub data

        dataset = datasets.load_dataset(hub)
        return {split: CodeSplit([str(p) for p in rows[prompt_column]], [str(c) for c in rows[completion_column]])
                for split, rows in dataset.items()}
    if dir:
        found = sorted(Path(dir).expanduser().glob("*.jsonl"))
        if not found:
            raise ValueError(f"code source: no *.jsonl files in {dir}")
        files = {path.stem: str(path) for path in found}
    splits = {}
    for split, path in files.items():
        header, rows = read_table(path, "jsonl")
        prompts = [str(v) for v in _column(header, rows, prompt_column, str(path))]
        splits[split] = CodeSplit(prompts, [str(v) for v in _column(header, rows, completion_column, str(path))])
    return splits

"""Text data sources, read on the host into plain Python lists and numpy label arrays.

Three kinds of source, each described by a small config dict and read by
:func:`fedlora_jax.data.sources.load_text_dataset`:

* ``{"kind": "glue", "task": "sst2", "dir": ".../SST-2"}`` reads a GLUE task from a local folder
  in the original GLUE layout (``train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv`` and
  ``dev_mismatched.tsv``). ``"root": ".../glue"`` instead of ``"dir"`` uses the task's standard
  folder name under it (``SST-2``, ``MNLI``, ...). ``{"kind": "glue", "task": "sst2", "hub": True}``
  reads ``nyu-mll/glue`` with ``datasets.load_dataset`` (needs the network or a populated cache).
* ``{"kind": "files", "files": {"train": "a.jsonl", "validation": "b.jsonl"}, "text_columns":
  ["text"], "label_column": "label"}`` reads generic JSON-lines, CSV, TSV or parquet files.
* ``{"kind": "gsm8k", "files": {"train": ".../train.jsonl", "test": ".../test.jsonl"}}`` reads
  GSM8K question/answer JSON lines into prompts, full answers and final numeric answers
  (:mod:`fedlora_jax.data.gsm8k`).

Split names follow the Hugging Face hub (``train``, ``validation``, ``validation_matched``,
``validation_mismatched``, ``test``) for local and hub sources alike, so configs do not change
when a source moves. Every missing file, column or unknown label raises ``ValueError`` with one
line naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

HUB_GLUE = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """One split of a text classification or regression data set.

    Attributes:
      texts_a: N first texts (the sentence, or the first sentence of a pair).
      texts_b: N second texts of sentence pairs, or None for single-sentence tasks.
      labels: [N] labels: int64 class ids in ``0..num_labels-1``, or float32 scores for
        regression tasks.
    """

    texts_a: list[str]
    texts_b: list[str] | None
    labels: np.ndarray

    def __post_init__(self):
        n = len(self.texts_a)
        if self.texts_b is not None and len(self.texts_b) != n:
            raise ValueError(f"texts_b has {len(self.texts_b)} entries but texts_a has {n}")
        if self.labels.shape != (n,):
            raise ValueError(f"labels have shape {self.labels.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.texts_a)


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """Metadata of one GLUE task.

    Attributes:
      folder: the task's folder name in the GLUE download (``SST-2``).
      text_columns: names of the text columns in the local TSV header (1 or 2).
      label_column: name of the label column in the local TSV header.
      hub_text_columns: names of the text columns on the hub (``nyu-mll/glue``).
      label_names: class names in GLUE's canonical order (index = class id), used to map string
        labels of the TSVs; None when the TSV labels are already numbers.
      num_labels: number of classes (1 for regression).
      metrics: metric names reported for the task (keys of ``metrics.task_metrics``).
      is_regression: whether labels are float scores.
      splits: split name -> local TSV file name, for the labelled splits.
      headerless_columns: column names of TSVs that have no header row (CoLA), else None.
    """

    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    hub_text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    num_labels: int
    metrics: tuple[str, ...]
    is_regression: bool
    splits: Mapping[str, str]
    headerless_columns: tuple[str, ...] | None = None


_TRAIN_DEV = {"train": "train.tsv", "validation": "dev.tsv"}
_ENTAILMENT = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        "SST-2", ("sentence",), "label", ("sentence",), None, 2, ("accuracy",), False, _TRAIN_DEV
    ),
    "cola": GlueTask(
        "CoLA", ("sentence",), "label", ("sentence",), None, 2, ("accuracy", "mcc"), False,
        _TRAIN_DEV, headerless_columns=("source", "label", "original_label", "sentence"),
    ),
    "mrpc": GlueTask(
        "MRPC", ("#1 String", "#2 String"), "Quality", ("sentence1", "sentence2"), None, 2,
        ("accuracy", "f1"), False, _TRAIN_DEV,
    ),
    "qqp": GlueTask(
        "QQP", ("question1", "question2"), "is_duplicate", ("question1", "question2"), None, 2,
        ("accuracy", "f1"), False, _TRAIN_DEV,
    ),
    "stsb": GlueTask(
        "STS-B", ("sentence1", "sentence2"), "score", ("sentence1", "sentence2"), None, 1,
        ("pearson", "spearman"), True, _TRAIN_DEV,
    ),
    "mnli": GlueTask(
        "MNLI", ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"), 3, ("accuracy",), False,
        {
            "train": "train.tsv",
            "validation_matched": "dev_matched.tsv",
            "validation_mismatched": "dev_mismatched.tsv",
        },
    ),
    "qnli": GlueTask(
        "QNLI", ("question", "sentence"), "label", ("question", "sentence"), _ENTAILMENT, 2,
        ("accuracy",), False, _TRAIN_DEV,
    ),
    "rte": GlueTask(
        "RTE", ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"), _ENTAILMENT, 2,
        ("accuracy",), False, _TRAIN_DEV,
    ),
}


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{what}: file not found: {path}")
    return path


def read_tsv(
    path: str | Path, column_names: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Reads a GLUE-style TSV: tab separated, no quoting (a ``"`` is an ordinary character).

    Args:
      path: the file.
      column_names: names of the columns of a file without a header row; None reads the first
        line as the header.

    Returns:
      (header, rows): the column names and the rows, each a list with one string per column.

    Raises:
      ValueError: if the file is missing or a row has a different number of fields than the
        header.
    """
    path = _require_file(Path(path), "TSV")
    # utf-8-sig drops the byte-order mark that some GLUE files (MRPC) start with.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(column_names) if column_names is not None else next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty (expected a header row)")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{reader.line_num}: {len(row)} fields, expected {len(header)}"
                )
            rows.append(row)
    return header, rows


def _column(header: Sequence[str], rows: Sequence[Sequence[Any]], name: str, where: str) -> list:
    if name not in header:
        raise ValueError(f"{where}: no column {name!r} (columns: {', '.join(map(str, header))})")
    j = list(header).index(name)
    return [row[j] for row in rows]


def _to_labels(
    values: Sequence[Any],
    where: str,
    label_names: Sequence[str] | None = None,
    label_map: Mapping[Any, int] | None = None,
    regression: bool = False,
) -> np.ndarray:
    """Converts raw label values (strings, ints, bools, floats) to an int64 or float32 array."""
    if regression:
        try:
            return np.asarray([float(v) for v in values], dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: non-numeric regression label ({e})") from None
    mapping = dict(label_map) if label_map is not None else None
    if label_names is not None:
        mapping = {name: i for i, name in enumerate(label_names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if mapping is not None:
            key = v if v in mapping else str(v)
            if key not in mapping:
                raise ValueError(
                    f"{where}: row {i}: unknown label {v!r} (known: {', '.join(map(str, mapping))})"
                )
            out[i] = mapping[key]
        else:
            try:
                out[i] = int(v)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{where}: row {i}: label {v!r} is not an integer; "
                    "give label_names or label_map"
                ) from None
    if out.size and out.min() < 0:
        raise ValueError(f"{where}: negative class label {out.min()} (unlabelled split?)")
    return out


def load_glue_local(
    task: str, directory: str | Path, splits: Iterable[str] | None = None
) -> dict[str, TextSplit]:
    """Reads a GLUE task from a local folder in the original GLUE layout.

    Args:
      task: GLUE task name, a key of ``GLUE_TASKS`` (``sst2``, ``mnli``, ...).
      directory: the task folder holding ``train.tsv``, ``dev.tsv`` (MNLI: ``dev_matched.tsv``,
        ``dev_mismatched.tsv``).
      splits: split names to read (``train``, ``validation``, ...); None reads all labelled
        splits of the task.

    Returns:
      split name -> TextSplit. Labels are int64 in GLUE's canonical label order (float32 scores
      for STS-B).
    """
    info = glue_task(task)
    directory = Path(directory)
    out = {}
    for split in _check_splits(task, info, splits):
        path = _require_file(directory / info.splits[split], f"GLUE {task} {split}")
        header, rows = read_tsv(path, info.headerless_columns)
        where = str(path)
        texts = [_column(header, rows, c, where) for c in info.text_columns]
        labels = _to_labels(
            _column(header, rows, info.label_column, where),
            where,
            label_names=info.label_names,
            regression=info.is_regression,
        )
        out[split] = TextSplit(texts[0], texts[1] if len(texts) > 1 else None, labels)
    return out


def load_glue_hub(task: str, splits: Iterable[str] | None = None) -> dict[str, TextSplit]:
    """Reads a GLUE task from the Hugging Face hub (``nyu-mll/glue``) with ``datasets``.

    Args:
      task: GLUE task name, a key of ``GLUE_TASKS``.
      splits: split names to read; None reads all labelled splits of the task.

    Returns:
      split name -> TextSplit, as :func:`load_glue_local` (the hub stores labels as class ids in
      the same canonical order).
    """
    info = glue_task(task)
    wanted = _check_splits(task, info, splits)
    import datasets  # deferred: importing datasets takes seconds and is only needed here

    dataset = datasets.load_dataset(HUB_GLUE, task)
    out = {}
    for split in wanted:
        where = f"{HUB_GLUE}/{task}[{split}]"
        if split not in dataset:
            raise ValueError(f"{where}: split not on the hub (has: {', '.join(dataset)})")
        data = dataset[split]
        texts = [list(data[c]) for c in info.hub_text_columns]
        labels = _to_labels(list(data["label"]), where, regression=info.is_regression)
        out[split] = TextSplit(texts[0], texts[1] if len(texts) > 1 else None, labels)
    return out


def glue_task(task: str) -> GlueTask:
    """Returns the metadata of a GLUE task; ValueError for an unknown name."""
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r} (known: {', '.join(GLUE_TASKS)})")
    return GLUE_TASKS[task]


def _check_splits(task: str, info: GlueTask, splits: Iterable[str] | None) -> list[str]:
    wanted = list(info.splits) if splits is None else list(splits)
    for split in wanted:
        if split not in info.splits:
            raise ValueError(
                f"GLUE {task} has no labelled split {split!r} (has: {', '.join(info.splits)})"
            )
    return wanted


_FORMATS = {
    ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"
}


def read_table(path: str | Path, file_format: str | None = None) -> tuple[list[str], list[list]]:
    """Reads a JSON-lines, CSV, TSV or parquet file into column names and rows.

    CSV uses standard double-quote quoting; TSV uses none (the GLUE convention).

    Args:
      path: the file.
      file_format: ``jsonl``, ``csv``, ``tsv`` or ``parquet``; None infers it from the suffix.

    Returns:
      (header, rows): column names, and rows as lists of values in header order (JSON-lines
      rows missing a key hold None).
    """
    path = Path(path)
    fmt = file_format or _FORMATS.get(path.suffix.lower())
    if fmt not in ("jsonl", "csv", "tsv", "parquet"):
        raise ValueError(f"{path}: unknown file format {fmt!r}; give format jsonl/csv/tsv/parquet")
    _require_file(path, "data")
    if fmt == "tsv":
        return read_tsv(path)
    if fmt == "csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path} is empty (expected a header row)")
            return header, [row for row in reader if row]
    if fmt == "parquet":
        import pyarrow.parquet as pq  # deferred: only parquet sources need pyarrow

        columns = pq.read_table(path).to_pydict()
        header = list(columns)
        return header, [list(r) for r in zip(*columns.values())]
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
    header = list(dict.fromkeys(k for r in records for k in r))
    return header, [[r.get(k) for k in header] for r in records]


def load_files(
    files: Mapping[str, str | Path],
    text_columns: Sequence[str],
    label_column: str,
    file_format: str | None = None,
    label_names: Sequence[str] | None = None,
    label_map: Mapping[Any, int] | None = None,
    regression: bool = False,
) -> dict[str, TextSplit]:
    """Reads generic local files (JSON lines, CSV, TSV, parquet), one per split.

    Args:
      files: split name -> path.
      text_columns: one or two text column names (single sentences or pairs).
      label_column: the label column.
      file_format: ``jsonl``, ``csv``, ``tsv`` or ``parquet``; None infers it per file.
      label_names: class names, index = class id; maps string labels.
      label_map: explicit label value -> class id (instead of label_names).
      regression: labels are float scores.

    Returns:
      split name -> TextSplit.
    """
    if len(text_columns) not in (1, 2):
        raise ValueError(f"text_columns must name 1 or 2 columns, got {list(text_columns)}")
    if label_names is not None and label_map is not None:
        raise ValueError("give label_names or label_map, not both")
    out = {}
    for split, path in files.items():
        header, rows = read_table(path, file_format)
        where = str(path)
        texts = [[str(t) for t in _column(header, rows, c, where)] for c in text_columns]
        labels = _to_labels(
            _column(header, rows, label_column, where), where, label_names, label_map, regression
        )
        out[split] = TextSplit(texts[0], texts[1] if len(texts) > 1 else None, labels)
    return out

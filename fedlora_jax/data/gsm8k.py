"""GSM8K: grade-school math word problems as prompt/answer pairs with a final number."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from fedlora_jax.data.text import _column, read_table


@dataclasses.dataclass(frozen=True)
class GSM8KSplit:
    """One split of GSM8K, ready for prompt/answer tokenisation.

    Attributes:
      prompts: N formatted prompts (the question inside the prompt template).
      answers: N full target texts: ``answer_prefix`` + the worked solution ending in
        ``#### <number>``.
      final_answers: N final numeric answers as strings, commas removed (``"1000"``).
    """

    prompts: list[str]
    answers: list[str]
    final_answers: list[str]

    def __post_init__(self):
        if not len(self.prompts) == len(self.answers) == len(self.final_answers):
            raise ValueError(
                f"GSM8K split lengths differ: {len(self.prompts)} prompts, "
                f"{len(self.answers)} answers, {len(self.final_answers)} final answers"
            )

    def __len__(self) -> int:
        return len(self.prompts)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_gsm8k_answer(text: str) -> str | None:
    """Returns the number after the last ``####`` in a GSM8K answer, commas removed.

    Args:
      text: a GSM8K solution (or a model generation in the same format).

    Returns:
      The number as a string (``"#### 1,000"`` -> ``"1000"``), or None if the text has no
      ``####`` followed by a number.
    """
    if "####" not in text:
        return None
    match = _NUMBER.search(text.rsplit("####", 1)[1])
    return match.group(0).replace(",", "") if match else None


def load_gsm8k(
    path: str | Path,
    prompt_template: str = "Question: {question}\nAnswer:",
    answer_prefix: str = " ",
) -> GSM8KSplit:
    """Reads a GSM8K JSON-lines file (``{"question": ..., "answer": "... #### 42"}`` per line).

    Args:
      path: the file.
      prompt_template: format string with a ``{question}`` field.
      answer_prefix: text put before every answer (a space, so the answer's first word tokenises
        as it would inside running text after the prompt).

    Returns:
      GSM8KSplit of prompts, answer_prefix + answers, and final numeric answers.
    """
    header, rows = read_table(path, "jsonl")
    where = str(path)
    questions = _column(header, rows, "question", where)
    answers = _column(header, rows, "answer", where)
    final = []
    for i, answer in enumerate(answers):
        number = extract_gsm8k_answer(answer)
        if number is None:
            raise ValueError(f"{where}: row {i}: answer has no '#### <number>' ending")
        final.append(number)
    prompts = [prompt_template.format(question=q) for q in questions]
    return GSM8KSplit(prompts, [answer_prefix + a for a in answers], final)

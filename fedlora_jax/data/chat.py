"""Chat templates: instruct prompts as the model was tuned on them.

The template (Jinja, as transformers keeps it) comes from the tokenizer source: a GGUF file's
``tokenizer.chat_template`` metadata, or a checkpoint folder's ``chat_template.jinja`` /
``tokenizer_config.json``. It is rendered in Jinja's sandboxed environment, as transformers does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def chat_template_of(tokenizer_source: str | os.PathLike) -> str | None:
    """The chat template of a ``.gguf`` file or a tokenizer folder; None when it has none."""
    path = Path(os.fspath(tokenizer_source)).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from gguf import GGUFReader  # deferred: optional dependency (the ``decoder`` extra)

        field = GGUFReader(path).fields.get("tokenizer.chat_template")
        return None if field is None else str(field.contents())
    folder = path if path.is_dir() else path.parent
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def apply_chat_template(template: str, user_texts: list[str], system: str | None = None) -> list[str]:
    """Each text as one user turn (after an optional system turn) followed by the assistant's
    generation prompt, rendered with ``template``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # deferred: only for chat prompts

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = environment.from_string(template)
    head = [{"role": "system", "content": system}] if system else []
    return [compiled.render(messages=[*head, {"role": "user", "content": text}], add_generation_prompt=True,
                            bos_token="", eos_token="") for text in user_texts]

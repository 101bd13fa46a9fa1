"""Loading a run configuration: a YAML file or a dict, ``--set key=value`` overrides, and pydantic's
validation errors turned into one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedlora_jax.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


# pydantic's error types for a value of the wrong type -> the type named in the message
_EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
             "list_type": "list", "dict_type": "dict"}


def _one_line(error: ValidationError) -> str:
    """One line for the first problem pydantic found (an unknown key before any other)."""
    problems = error.errors(include_url=False)
    first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    key, kind, value = ".".join(str(part) for part in first["loc"]), first["type"], first.get("input")
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    if kind == "config_rule":
        return first["msg"]
    if kind == "config_value":
        return f"config key '{key}' {first['msg']}, got {value!r}"
    if kind in _EXPECTED:
        return f"config key '{key}': expected {_EXPECTED[kind]}, got {value!r}"
    if kind == "model_type":
        return f"config section '{key or 'root'}' must be a mapping, got {value!r}"
    if kind == "missing":
        return f"config key '{key}' is required"
    return f"config key '{key}': {first['msg']}, got {value!r}"


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Sets ``raw[a][b][c] = value`` for ``a.b.c``; a missing or null section on the way becomes a
    mapping (so ``federation.server_optimizer.name=adam`` fills a null ``server_optimizer``)."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """Parses ``key=value`` strings; values are read as YAML (numbers, lists, null...)."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        out.append((key.strip(), value))
    return out


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or a dict), applies overrides, and validates (:class:`ConfigError` on the
    first problem)."""
    if source is None:
        raw: Any = {}
    elif isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config section 'root' must be a mapping, got {raw!r}")
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy the overrides may change
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None

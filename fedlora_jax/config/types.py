"""The value types of config fields: strict numbers with bounds, choices, sections.

A rule a value breaks is a pydantic error of type ``config_value`` ("must be <rule>") on its key;
a rule over several keys is a ``config_rule`` error holding the whole line.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError


def _number_from_text(value: Any) -> Any:
    """A numeric string ('1e-3', '5') as a float; anything else unchanged (the float type checks it)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _must_be(rule: str) -> WrapValidator:
    """Reports any failure of the wrapped type, except a wrong type of the value itself (which the
    loader words as "expected <type>"), as the one error "must be <rule>"."""

    def check(value: Any, handler):
        try:
            return handler(value)
        except ValidationError as e:
            first = e.errors()[0]
            if first["loc"] == () and first["type"].endswith("_type"):
                raise
            raise PydanticCustomError("config_value", "must be {rule}", {"rule": rule}) from None

    return WrapValidator(check)


def _rule_broken(message: str) -> PydanticCustomError:
    """The error for a rule over several keys; ``message`` is the whole line the user sees."""
    return PydanticCustomError("config_rule", "{message}", {"message": message})


Float = Annotated[float, BeforeValidator(_number_from_text)]


def bounded(kind: type, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None, nullable: bool = False) -> Any:
    """``kind`` (int or float) with a lower bound (``gt`` or ``ge``) and optionally an upper one
    (``lt`` or ``le``), checked by pydantic; the rule reads "> 0", ">= 1", "in [0, 1)", "in (0, 1)"
    or "in (0, 1]", with " or null" when ``nullable``."""
    low = f"({gt:g}" if gt is not None else f"[{ge:g}"
    if lt is not None or le is not None:
        rule = f"in {low}, {lt:g})" if lt is not None else f"in {low}, {le:g}]"
    else:
        rule = f"> {gt:g}" if gt is not None else f">= {ge:g}"
    base = Float if kind is float else kind
    tp = base | None if nullable else base
    return Annotated[tp, Field(gt=gt, ge=ge, lt=lt, le=le), _must_be(rule + (" or null" if nullable else ""))]


def one_of(*choices: str | None) -> Any:
    """One of ``choices`` (None for null); the rule reads "a, b or c"."""
    names = ["null" if c is None else c for c in choices]
    return Annotated[Literal[choices], _must_be(", ".join(names[:-1]) + " or " + names[-1])]


Count = bounded(int, ge=1)
OptionalCount = bounded(int, ge=1, nullable=True)
Positive = bounded(float, gt=0)
Probability = bounded(float, gt=0, lt=1)
Decay = bounded(float, ge=0, lt=1)
CountOrAuto = Annotated[Count | Literal["auto"] | None, _must_be("an int >= 1, auto or null")]


def _whole_count_or_fraction(k: float | None) -> float | None:
    if k is not None and not (k > 0 and (k < 1 or k.is_integer())):
        raise ValueError("not a whole count or a fraction")
    return k


def _min_max(bounds: list[int]) -> list[int]:
    if bounds[0] > bounds[1]:
        raise ValueError("min > max")
    return bounds


ClientsPerRound = Annotated[Float | None, AfterValidator(_whole_count_or_fraction),
                            _must_be("a whole count >= 1 or a fraction in (0, 1)")]
MinMax = Annotated[list[Count], Field(min_length=2, max_length=2), AfterValidator(_min_max),
                   _must_be("[min, max] with 1 <= min <= max")]


class Section(BaseModel):
    """A config section: strict types, no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _none_is_empty(value: Any) -> Any:
    return {} if value is None else value


def _section(cls: type[Section]) -> Any:
    """A section field: an empty YAML section (``privacy:``) means every default."""
    return Annotated[cls, BeforeValidator(_none_is_empty), Field(default_factory=cls)]

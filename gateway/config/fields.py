"""The building blocks of the config tables: strict value types, and errors as dotted keys.

TOML has no implicit conversions, so neither do the tables: `port = "80"` is an error, and so
is `weight = true`. A problem reads `<dotted key> <what is wrong>, got <value>`; `format_error`
writes pydantic's errors that way, whatever validator found them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# Unknown keys are refused: a misspelt setting must not leave its default silently in place.
TABLE = ConfigDict(extra="forbid")

Positive = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Rate = Annotated[StrictFloat, Field(ge=0)]  # tokens per minute; 0 = no limit
Count = Annotated[StrictInt, Field(ge=1)]
Natural = Annotated[StrictInt, Field(ge=0)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def one_of(names: Sequence[str]) -> AfterValidator:
    """A check that a string is one of `names` (a registry's, or the perf model's presets)."""

    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"must be one of {list(names)}, got {value!r}")
        return value

    return AfterValidator(check)


def lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _valid_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError("is not a valid name (letters, digits, . _ : / -)")
    return name


def _hex64(digest: str) -> str:
    # Without the value: a key pasted here in place of its digest must not reach the logs.
    if not _HEX64.match(digest):
        raise ValueError("must be 64 hex digits (a SHA-256 digest)")
    return digest


Name = Annotated[str, AfterValidator(_valid_name)]  # of a tenant or a model
Digest = Annotated[StrictStr, BeforeValidator(lower), AfterValidator(_hex64)]  # SHA-256, hex

# --- Errors.

Loc = tuple[str | int, ...]
Problem = tuple[Loc, object, str]  # key (from the table being validated), value, what is wrong

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_KINDS = {
    "int_type": "int", "float_type": "int or float", "string_type": "str", "bool_type": "bool",
    "list_type": "list", "tuple_type": "list",
    "dict_type": "a table", "dataclass_type": "a table", "model_type": "a table",
}  # fmt: skip
_BOUNDS = {
    "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"), "less_than_equal": ("<=", "le"),
}  # fmt: skip


def dotted(loc: Sequence[str | int]) -> str:
    """`loc` written as a TOML key: `engines.us-east."llama-3.1-8b"[0].gpu`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":  # pydantic's mark for a problem with a table's key, not its value
            key = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out = f"{out}.{key}" if out else key
    return out


def _message(err: ErrorDetails) -> str:
    kind, value, ctx = err["type"], err["input"], err.get("ctx", {})
    if kind in _KINDS:
        return f"must be {_KINDS[kind]}, got {value!r}"
    if kind in _BOUNDS:
        op, bound = _BOUNDS[kind]
        limit = ctx[bound]
        return f"must be {op} {f'{limit:g}' if isinstance(limit, float) else limit}, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}, got {value!r}"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return "is not a known setting"
    if kind in ("missing", "missing_keyword_argument"):
        return "is required"
    if kind == "value_error":
        return str(ctx["error"])
    return err["msg"]  # from `report`, or pydantic's words for a case not foreseen here


def format_error(err: ErrorDetails) -> str:
    """One pydantic error as `<dotted key> <problem>`; a problem that starts with ':' is
    written right after its key (`engines: at least one engine is needed`)."""
    key, message = dotted(err["loc"]), _message(err)
    if not key:
        return message.lstrip(": ")
    return f"{key}{'' if message.startswith(':') else ' '}{message}"


def report(problems: list[Problem]) -> None:
    """Raise every problem found, each at its own key, from a validator.

    A validator that raises ValueError reports one problem; checks across entries find
    several, and pydantic keeps every one of them when they come as a ValidationError."""
    if problems:
        raise ValidationError.from_exception_data(
            "config",
            [
                InitErrorDetails(type=PydanticCustomError("config", msg), loc=loc, input=value)
                for loc, value, msg in problems
            ],
        )

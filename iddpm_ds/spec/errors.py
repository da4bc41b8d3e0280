"""Spec errors as one line that names the field: what a user sees for a bad job file.

Validators raise `FieldError(field, message)` with the field relative to the section that
checks it; pydantic adds the section's location, so the user reads `model.num_channels`
whether the error came from a type check, a range check or a cross-field validator.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional

from pydantic import ValidationError


class FieldError(ValueError):
    """A constraint broken by one field; `field` is dotted, relative to the validating section."""

    def __init__(self, field: str, message: str) -> None:
        # str() keeps the field for readers of a plain str(ValidationError)
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class JobError(ValueError):
    """A job that cannot be used; str() is one line naming the file and the field."""


def unknown_key_message(key: object, known: Iterable[str]) -> str:
    """'unknown key; did you mean ...?' (difflib), else the keys that exist."""
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=2, cutoff=0.6)
    if close:
        return "unknown key; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"unknown key (known: {', '.join(known)})"


def _loc_text(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def error_field(item: dict[str, Any]) -> tuple[str, ...]:
    """The full location of one pydantic error, with a FieldError's own field appended."""
    loc = tuple(item["loc"])
    cause = (item.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError) and cause.field:
        loc += tuple(cause.field.split("."))
    return loc


_PREFIXES = ("Value error, ", "Assertion failed, ")
_REWORDED = {
    "missing": "is required",
    "model_type": "must be a mapping of fields",
    "dict_type": "must be a mapping",
}


def error_message(item: dict[str, Any]) -> str:
    """One pydantic error's message, without pydantic's prefixes, with the offending value."""
    kind, msg = item["type"], item["msg"]
    cause = (item.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return cause.message
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = _REWORDED.get(kind, msg)
    if kind in ("missing", "value_error", "assertion_error") or isinstance(item.get("input"), dict):
        return msg
    got = repr(item.get("input"))
    return f"{msg} (got {got if len(got) <= 80 else got[:77] + '...'})"


def describe(err: ValidationError, prefix: str = "",
             line_of: Optional[Any] = None) -> str:
    """All errors of a ValidationError on one line: `field: message; field: message`.

    `prefix` (e.g. a file name) goes first; `line_of(loc)` may return the YAML line of a
    location, shown as `file:LINE` for the first error."""
    parts = []
    for i, item in enumerate(err.errors()):
        loc = error_field(item)
        field = _loc_text(loc) or "(top level)"
        parts.append(f"{field}: {error_message(item)}")
        if i == 0 and prefix and line_of is not None:
            line = line_of(loc)
            if line is not None:
                prefix = f"{prefix}:{line}"
    text = "; ".join(parts)
    return f"{prefix}: {text}" if prefix else text

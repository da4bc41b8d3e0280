"""Shared base for every spec section: strict, immutable, field docstrings as docs."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Base of all spec sections: unknown keys are errors, values are validated on
    assignment, and the docstring under each field becomes its JSON-schema description."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )


def parse_int_list(value: object) -> object:
    """Accept the reference's comma strings ("16,8") as well as lists; "" means empty."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        return tuple(int(p) for p in parts)
    if isinstance(value, int):
        return (value,)
    return value

"""Shared base for every spec section: strict, immutable, field docstrings as docs."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import FieldError, unknown_key_message


class Spec(BaseModel):
    """Base of all spec sections: unknown keys are errors (with a did-you-mean), values are
    validated on assignment, inf/nan are no number, and the docstring under each field
    becomes its JSON-schema description."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # extra="forbid" would reject these too, but could not suggest the intended key
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise FieldError(str(key), unknown_key_message(key, cls.model_fields))
        return data


def parse_int_list(value: object) -> object:
    """Accept the reference's comma strings ("16,8") as well as lists; "" means empty."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"expected comma-separated integers such as \"16,8\", got {value!r}") \
                from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    return value

"""The job-file reference (docs/job_file.md), generated from the job spec's JSON schema.

The schema is the single source: field docstrings become descriptions, so the reference
cannot drift from what the validator accepts (a test compares the committed file).
"""
from __future__ import annotations

import json
from typing import Any

from .job import JobSpec

_CONSTRAINTS = (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"),
                ("exclusiveMaximum", "< {}"), ("minLength", "length >= {}"))

HEADER = """# The job file: every field

Generated from the job spec's JSON schema by
`python launch/train.py --schema docs/job_file.md` (a `.json` path writes the schema
itself, for editors). Do not edit by hand: `tests/test_docs.py` fails when this file and
the spec disagree.

A job file is YAML with the sections below; every field is optional unless marked
**required**. Unknown keys are errors. Any field can be overridden on the command line
with `--set section.field=value`. `python launch/train.py --job J --check` prints the
resolved spec with every default spelled out.
"""


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return "section"
    if "enum" in prop:
        return ", ".join(f"`{v}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{prop['const']}`"
    if "anyOf" in prop:
        return " or ".join(_type_of(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(prop.get('items', {}))}"
    if kind == "object":
        return "mapping"
    return {"null": "null"}.get(kind, kind)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if isinstance(value, dict):
        return "(see section)"
    return f"`{json.dumps(value)}`"


def _constraints(prop: dict[str, Any]) -> str:
    found = [fmt.format(prop[key]) for key, fmt in _CONSTRAINTS if key in prop]
    for option in prop.get("anyOf", []):
        found += [fmt.format(option[key]) for key, fmt in _CONSTRAINTS if key in option]
    return f" ({', '.join(found)})" if found else ""


def _table(name: str, schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = [f"### `{name}`", "", _cell(schema.get("description", "")).strip(), "",
            "| field | type | default | meaning |", "|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        rows.append(f"| `{field}` | {_cell(_type_of(prop))} | "
                    f"{_cell(_default(prop, field in required))} | "
                    f"{_cell(prop.get('description', ''))}{_constraints(prop)} |")
    return rows + [""]


def job_reference_markdown() -> str:
    """docs/job_file.md: the top level, then one table per section in schema order."""
    schema = JobSpec.model_json_schema()
    defs = schema.get("$defs", {})
    lines = [HEADER, "## Top level", ""] + _table("job", schema)[2:]
    lines += ["## Sections", ""]
    for field, prop in schema["properties"].items():
        ref = prop.get("$ref") or next((p["$ref"] for p in prop.get("anyOf", []) if "$ref" in p), None)
        if ref:
            lines += _table(field, defs[ref.rsplit("/", 1)[-1]])
    nested = sorted(set(defs) - {p.get("$ref", "").rsplit("/", 1)[-1]
                                 for p in schema["properties"].values()})
    for name in nested:
        lines += _table(name, defs[name])
    return "\n".join(lines).rstrip() + "\n"

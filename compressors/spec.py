"""Compressor specs: one compressor with its options as a short string, a dict, or a JSON object.

    "identity"                                   {"name": "identity"}
    "powersgd:rank=2"                            {"name": "powersgd", "rank": 2}
    "powersgd:rank=2:warm_start=false"           {"name": "powersgd", "rank": 2, "warm_start": False}
    "powersgd:rank=2,warm_start=false"           the same (',' between options also works)
    "powersgd:rank_schedule=[[0,4],[100,2]]"     lists as JSON/Python literals
    '{"name": "topk", "ratio": 0.01}'            a JSON object

Options follow the name after ':' and are separated by ':' or ','. Values: true/false, none/null, numbers,
lists and quoted strings as literals, anything else as a plain string. Inside a comma-separated list of
specs (``--grid compressor=identity,powersgd:rank=2,warm_start=false,topk:ratio=0.01``) a piece that has
an '=' but no ':' continues the spec before it, since a compressor name never contains '='; writing the
options with ':' (``powersgd:rank=2:warm_start=false``) reads the same everywhere.

``spec_label`` is the readable name used in tables: ``powersgd(rank=2)``, ``identity``.
"""
from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from .options import invalid

SYNTAX = "a name, 'name:key=value:key=value' (e.g. 'powersgd:rank=2'), a JSON object or a dict with a 'name'"


def parse_value(text: str) -> Any:
    """true/false -> bool, none/null -> None, a Python/JSON literal (number, list, quoted string), else the text."""
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(stripped)  # JSON spellings inside lists: [true, null]
    except ValueError:
        return stripped


def split_outside_brackets(text: str, separators: str) -> list[str]:
    """Split on any of ``separators`` outside [], {} and (): "a=[1,2],b=3" -> ["a=[1,2]", "b=3"]."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{(") - (char in "]})")
        if char in separators and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_spec(value: Any, owner: str = "compressor", field: str = "compressor") -> dict[str, Any]:
    """A compressor spec as a dict ``{"name": ..., **options}``; ValueError naming ``field`` if it is none.

    Only the form is checked here; the name and options are checked by ``compressors.make``."""
    if isinstance(value, Mapping):
        if "name" not in value or not isinstance(value["name"], str):
            raise invalid(owner, field, value, SYNTAX)
        if not all(isinstance(k, str) for k in value):
            raise invalid(owner, field, value, "a mapping whose keys are option names (strings)")
        return dict(value)
    if not isinstance(value, str) or not value.strip():
        raise invalid(owner, field, value, SYNTAX)
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise invalid(owner, field, value, SYNTAX + ' (JSON such as {"name": "powersgd", "rank": 2})') from None
        return parse_spec(data, owner, field)
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or "=" in name:
        raise invalid(owner, field, value, SYNTAX)
    spec: dict[str, Any] = {"name": name}
    for item in split_outside_brackets(rest, ":,"):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise invalid(owner, field, value, SYNTAX + f" ({item.strip()!r} is not key=value)")
        if key == "name" or key in spec:
            raise invalid(owner, field, value, SYNTAX + f" ({key!r} is given twice)")
        spec[key] = parse_value(raw)
    return spec


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs: "identity,powersgd:rank=2,warm_start=false" ->
    ["identity", "powersgd:rank=2,warm_start=false"] (a piece with '=' but no ':' continues the spec before it)."""
    specs: list[str] = []
    for piece in split_outside_brackets(text, ","):
        stripped = piece.strip()
        head = stripped.split("=", 1)[0]
        if specs and "=" in stripped and ":" not in head and not stripped.startswith("{"):
            specs[-1] += "," + stripped
        else:
            specs.append(stripped)
    return specs


def format_value(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def spec_label(spec: Any) -> str:
    """``powersgd(rank=2, warm_start=False)``; ``identity`` for a compressor without options."""
    spec = parse_spec(spec)
    options = ", ".join(f"{k}={format_value(v)}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({options})" if options else spec["name"]


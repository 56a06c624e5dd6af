"""Replies machines can read: a JSON Schema subset compiled into a GBNF grammar, and the check of what came out.

The subset is what a grammar can enforce while decoding: objects whose properties are all required (generated in
the schema's order), strings with ``maxLength``/``minLength`` or an ``enum``, integers and numbers (their digits are
bounded by ``minimum``/``maximum``; the bounds themselves are checked after parsing), booleans, and arrays with
``maxItems``/``minItems``. Anything else is a ``SchemaError`` naming the place in the schema: no silent fallback to
a generic JSON grammar. Strings are bounded repetitions (``{0,200}``), never hundreds of nested rules, and cannot
hold raw control characters, so every completed reply parses with ``json.loads``.

Pure: no llama.cpp here; the engine turns the grammar text into a ``LlamaGrammar``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_LENGTH = 200
"""A string without ``maxLength`` or ``enum`` is bounded to this many characters."""
DEFAULT_MAX_ITEMS = 16
"""An array without ``maxItems`` is bounded to this many items."""

# One character of a JSON string: anything but a quote, a backslash or a control character, or a simple escape.
CHAR_RULE = r'char ::= [^"\\\x00-\x1F\x7F] | "\\" ["\\/bfnrt]'


class SchemaError(ValueError):
    """The schema uses something the grammar cannot enforce; the message names where."""


@dataclass(frozen=True)
class Grammar:
    """A compiled schema."""

    schema: Mapping[str, Any]
    """The JSON Schema it was compiled from."""
    gbnf: str
    """The grammar, in llama.cpp's GBNF."""
    max_chars: int
    """The longest reply the grammar allows, in characters (a bound for ``max_tokens``)."""


@dataclass
class _Builder:
    rules: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, body: str) -> str:
        base, n = name, 1
        while name in self.rules and self.rules[name] != body:
            n += 1
            name = f"{base}{n}"
        self.rules[name] = body
        return name


def compile_schema(schema: Mapping[str, Any]) -> Grammar:
    """Compile ``schema`` into a grammar; ``SchemaError`` says what is not supported, and where."""
    if not isinstance(schema, Mapping):
        raise SchemaError("the schema must be an object")
    b = _Builder()
    root, longest = _node(schema, b, "root", "$")
    body = b.rules.pop(root)
    lines = [f"root ::= {body}", *(f"{k} ::= {v}" for k, v in b.rules.items()), CHAR_RULE]
    return Grammar(schema=schema, gbnf="\n".join(lines) + "\n", max_chars=longest)


def _literal(value: str) -> str:
    """A GBNF string literal matching ``value`` exactly."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _node(s: Mapping[str, Any], b: _Builder, name: str, where: str) -> tuple[str, int]:
    """The rule for schema node ``s`` and the longest text it allows."""
    unsupported = set(s) - {"type", "properties", "required", "additionalProperties", "maxLength", "minLength",
                            "enum", "minimum", "maximum", "items", "maxItems", "minItems", "description", "title",
                            "$schema"}
    if unsupported:
        raise SchemaError(f"{where}: not supported by the grammar: {', '.join(sorted(unsupported))}")
    kind = s.get("type")
    if "enum" in s:
        values = s["enum"]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SchemaError(f"{where}.enum: must be a non-empty list of strings")
        alternatives = [_literal(json.dumps(v, ensure_ascii=False)) for v in values]
        return b.add(name, " | ".join(alternatives)), max(len(json.dumps(v, ensure_ascii=False)) for v in values)
    if kind == "object":
        props = s.get("properties")
        if not isinstance(props, Mapping) or not props:
            raise SchemaError(f"{where}: an object needs properties")
        required = s.get("required", list(props))
        optional = [k for k in props if k not in required]
        if optional:
            raise SchemaError(f"{where}: every property must be required (the grammar generates them all): "
                              f"{', '.join(optional)}")
        if s.get("additionalProperties", False) is not False:
            raise SchemaError(f"{where}.additionalProperties: must be false (or left out)")
        parts, longest = [], 2
        for i, (key, sub) in enumerate(props.items()):
            if not isinstance(sub, Mapping):
                raise SchemaError(f"{where}.properties.{key}: must be a schema object")
            rule, n = _node(sub, b, f"{name}-{_slug(key)}", f"{where}.properties.{key}")
            sep = "" if i == 0 else '"," " "? '
            parts.append(f'{sep}{_literal(json.dumps(key, ensure_ascii=False))} ":" " "? {rule}')
            longest += len(json.dumps(key, ensure_ascii=False)) + 3 + n + (2 if i else 0)
        return b.add(name, '"{" ' + " ".join(parts) + ' "}"'), longest
    if kind == "string":
        hi = s.get("maxLength", DEFAULT_MAX_LENGTH)
        lo = s.get("minLength", 0)
        if not (isinstance(hi, int) and isinstance(lo, int) and 0 <= lo <= hi):
            raise SchemaError(f"{where}: minLength/maxLength must be integers with 0 <= minLength <= maxLength")
        return b.add(name, f'"\\"" char{{{lo},{hi}}} "\\""'), 2 + 2 * hi
    if kind in ("integer", "number"):
        lo, hi = s.get("minimum"), s.get("maximum")
        for key, bound in (("minimum", lo), ("maximum", hi)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
                raise SchemaError(f"{where}.{key}: must be a number")
        if lo is None or hi is None or lo > hi:
            raise SchemaError(f"{where}: a {kind} needs minimum and maximum (minimum <= maximum) to bound its digits")
        digits = max(1, len(str(int(max(abs(lo), abs(hi))))))
        sign = '"-"? ' if lo < 0 else ""
        body = f"{sign}[0-9]{{1,{digits}}}"
        longest = digits + (1 if lo < 0 else 0)
        if kind == "number":
            body += ' ("." [0-9]{1,6})?'
            longest += 7
        return b.add(name, body), longest
    if kind == "boolean":
        return b.add(name, '"true" | "false"'), 5
    if kind == "array":
        items = s.get("items")
        if not isinstance(items, Mapping):
            raise SchemaError(f"{where}.items: an array needs one items schema")
        hi = s.get("maxItems", DEFAULT_MAX_ITEMS)
        lo = s.get("minItems", 0)
        if not (isinstance(hi, int) and isinstance(lo, int) and 0 <= lo <= hi and hi >= 1):
            raise SchemaError(f"{where}: minItems/maxItems must be integers with 0 <= minItems <= maxItems, "
                              "maxItems >= 1")
        item, n = _node(items, b, f"{name}-item", f"{where}.items")
        more = f'("," " "? {item}){{{max(lo - 1, 0)},{hi - 1}}}'
        body = f'"[" {item} {more} "]"' if lo >= 1 else f'"[" ({item} {more})? "]"'
        return b.add(name, body), 2 + hi * (n + 2)
    raise SchemaError(f"{where}.type: {kind!r} is not supported (object, string, integer, number, boolean, array)")


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in key.lower()) or "p"


def validate(value: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema`` (the compiled subset): an empty list when it conforms."""
    errors: list[str] = []
    if "enum" in schema:
        if value not in schema["enum"]:
            errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
        return errors
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        props = schema.get("properties", {})
        for key in schema.get("required", list(props)):
            if key not in value:
                errors.append(f"{where}: {key!r} is missing")
        for key in value:
            if key not in props:
                errors.append(f"{where}: {key!r} is not in the schema")
            else:
                errors += validate(value[key], props[key], f"{where}.{key}")
    elif kind == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string"]
        if not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", DEFAULT_MAX_LENGTH):
            errors.append(f"{where}: length {len(value)} is out of bounds")
    elif kind in ("integer", "number"):
        ok = isinstance(value, int) if kind == "integer" else isinstance(value, int | float)
        if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            return [f"{where}: not an {kind}"]
        if not schema["minimum"] <= value <= schema["maximum"]:
            errors.append(f"{where}: {value} is outside {schema['minimum']}..{schema['maximum']}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            errors.append(f"{where}: not a boolean")
    elif kind == "array":
        if not isinstance(value, list):
            return [f"{where}: not an array"]
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", DEFAULT_MAX_ITEMS):
            errors.append(f"{where}: {len(value)} items is out of bounds")
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{i}]")
    return errors

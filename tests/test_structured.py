"""Structured replies: the JSON Schema subset compiled into a grammar, and the check of what came out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_assistant.structured import SchemaError, compile_schema, validate
from edge_assistant.tomlconf import merge

from conftest import ROOT
from fakes import MODEL_ANSWERS

PLC = {"type": "object", "properties": {
    "severity": {"type": "string", "enum": ["info", "warning", "critical"]},
    "cause": {"type": "string", "maxLength": 120},
    "action": {"type": "string", "maxLength": 160}},
    "required": ["severity", "cause", "action"]}


def test_grammar_is_bounded_and_parses_in_llama_cpp() -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    g = compile_schema(PLC)
    assert 'char{0,120}' in g.gbnf and 'char{0,160}' in g.gbnf  # bounded repetitions, not nested rules
    assert g.gbnf.count("\n") < 10
    assert "\\x00-\\x1F" in g.gbnf  # no raw control characters inside strings
    LlamaGrammar.from_string(g.gbnf, verbose=False)  # llama.cpp's own parser accepts it


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": []}, "every property must be required"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}, "pattern"),
    ({"type": "integer"}, "needs minimum and maximum"),
    ({"type": "array", "items": [{"type": "string"}]}, "one items schema"),
    ({"type": "null"}, "not supported"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True}, "must be false"),
    ({"type": "string", "enum": [1, 2]}, "list of strings"),
    ({"anyOf": [{"type": "string"}]}, "anyOf"),
])
def test_unsupported_schemas_fail_by_name(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        compile_schema(schema)


@pytest.mark.parametrize(("value", "errors"), [
    ({"severity": "info", "cause": "low coolant", "action": "top up"}, 0),
    ({"severity": "fatal", "cause": "x", "action": "y"}, 1),
    ({"severity": "info", "cause": "x"}, 1),
    ({"severity": "info", "cause": "x", "action": "y", "extra": 1}, 1),
    ({"severity": "info", "cause": "x" * 121, "action": "y"}, 1),
    ([], 1),
])
def test_validate(value: Any, errors: int) -> None:
    assert len(validate(value, PLC)) == errors


def test_numbers_booleans_arrays() -> None:
    schema = {"type": "object", "properties": {
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "offset": {"type": "number", "minimum": -10, "maximum": 10},
        "stop": {"type": "boolean"},
        "checks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3}}}
    g = compile_schema(schema)
    assert "[0-9]{1,1}" in g.gbnf and '"-"? [0-9]{1,2}' in g.gbnf and '{0,2}' in g.gbnf
    assert validate(json.loads('{"priority": 3, "offset": -2.5, "stop": true, "checks": ["coolant"]}'), schema) == []
    assert validate({"priority": 9, "offset": 0, "stop": True, "checks": ["a"]}, schema)  # out of bounds
    assert validate({"priority": 1, "offset": 0, "stop": 1, "checks": []}, schema)  # not a boolean, too few items


MACHINES = ["lathe 1", "mill 4", "the saw", "machining centre 2", "the grinder"]
SYMPTOMS = ["coolant pressure is low", "the spindle overheats", "the chip conveyor jammed", "axis X lost position",
            "the tool changer stopped half way", "the door switch reports open"]


def test_replies_follow_the_schema(model_path) -> None:  # type: ignore[no-untyped-def]
    """Thirty varied requests to the real model: every reply parses and validates (scripts/bench runs 200)."""
    from edge_assistant import app
    from edge_assistant.config import load_config
    from edge_assistant.messages import Request
    from edge_assistant.pipeline import handle

    config = load_config(ROOT / "examples" / "plc-json.toml",
                         {"model": {"dir": str(model_path.parent)}, "mqtt": {"enabled": False}})
    runtime = app.load(config, app.plan(config))
    try:
        texts = [f"On {m}, {s}." for m in MACHINES for s in SYMPTOMS]
        for text in texts:
            reply = handle(runtime, Request(text=text, persona="alarm_json"))
            assert reply.status == "ok", (text, reply)
            assert json.loads(reply.text) == reply.data and validate(reply.data, PLC) == [], (text, reply.text)
    finally:
        runtime.close()


def test_stop_sequences_end_the_answer(model_path) -> None:  # type: ignore[no-untyped-def]
    from edge_assistant import app
    from edge_assistant.config import load_config
    from edge_assistant.engine import StopText
    from edge_assistant.messages import Request
    from edge_assistant.pipeline import handle

    s = StopText(["\n\n", "END"])
    assert s.feed("abc E") == ("abc ", False)  # "E" may start "END": held back
    assert s.feed("ND more") == ("", True)
    s = StopText(["END"])
    assert s.feed("x EN") == ("x ", False) and s.flush("") == "EN"
    config = load_config(None, merge(MODEL_ANSWERS, {"model": {"dir": str(model_path.parent)},
                                                     "mqtt": {"enabled": False}}))
    runtime = app.load(config, app.plan(config))
    try:
        q = Request(text="List three checks before starting the lathe, one per line.", max_tokens=120)
        free = handle(runtime, q)
        words = free.text.split()
        assert len(words) > 6
        stop = words[4]
        stopped_cfg = load_config(None, merge(MODEL_ANSWERS, {
            "model": {"dir": str(model_path.parent)}, "mqtt": {"enabled": False},
            "personas": {"factory": {"sampling": {"stop": [stop]}}}}))
        runtime2 = app.load(stopped_cfg, app.plan(stopped_cfg))
        try:
            pieces: list[str] = []
            cut = handle(runtime2, q, on_text=pieces.append)
        finally:
            runtime2.close()
        assert cut.status == "ok" and stop not in cut.text and cut.usage is not None
        assert cut.usage.finish_reason == "stop"
        assert free.text.startswith(cut.text) and len(cut.text) < len(free.text)
        assert "".join(pieces).strip() == cut.text
    finally:
        runtime.close()

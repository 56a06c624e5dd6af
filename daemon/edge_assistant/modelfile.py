"""Ollama Modelfiles as personas: parse one, and write the persona as TOML for the config.

Pure: the caller reads the file and says which model files exist. What a persona cannot carry is reported with
its line number, never dropped in silence: ``TEMPLATE`` (the model's own chat template is kept), parameters
without a counterpart, adapters, and unknown directives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

SAMPLING = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float}
"""Modelfile parameters that map onto ``[personas.<name>.sampling]`` under the same name."""


@dataclass
class Imported:
    """A persona read from a Modelfile."""

    persona: dict[str, Any] = field(default_factory=dict)
    """The persona's table, as the config takes it."""
    notes: list[str] = field(default_factory=list)
    """What was not carried over, or needs the reader's attention, each with its line."""
    model: str = ""
    """The ``FROM`` line's model (a name or a path)."""


def parse(text: str, model_files: set[str] | None = None, base: str = "") -> Imported:
    """Read a Modelfile. ``model_files``: the GGUF file names in the model directory, to check ``FROM`` against;
    ``base``: the Modelfile's directory, against which a relative ``ADAPTER`` path is resolved (as Ollama does)."""
    out = Imported()
    sampling: dict[str, Any] = {}
    stops: list[str] = []
    examples: list[dict[str, str]] = []
    pending_user: str | None = None
    for lineno, directive, arg in _directives(text, out.notes):
        where = f"line {lineno}"
        if directive == "FROM":
            out.model = arg
            name = arg.rsplit("/", 1)[-1]
            if model_files is not None and name not in model_files and f"{name}.gguf" not in model_files:
                out.notes.append(f"{where}: FROM {arg}: not in the model directory (it holds "
                                 f"{', '.join(sorted(model_files)) or 'no GGUF file'}); the daemon chooses its model "
                                 "by profile, or set model.file")
        elif directive == "SYSTEM":
            out.persona["system_prompt"] = arg
        elif directive == "PARAMETER":
            key, _, value = arg.partition(" ")
            key, value = key.strip().lower(), _unquote(value.strip())
            try:
                if key in SAMPLING:
                    sampling[key] = SAMPLING[key](value)
                elif key == "seed":
                    out.persona["seed"] = int(value)
                elif key == "num_predict":
                    sampling["max_tokens"] = int(value)
                elif key == "stop":
                    stops.append(value)
                elif key == "num_ctx":
                    out.notes.append(f"{where}: PARAMETER num_ctx {value}: the context is the hardware profile's; "
                                     f"set [profile] n_ctx = {int(value)} for the whole daemon")
                else:
                    out.notes.append(f"{where}: PARAMETER {key}: no counterpart in a persona, not used")
            except ValueError:
                out.notes.append(f"{where}: PARAMETER {key} {value!r}: not a number, not used")
        elif directive == "MESSAGE":
            role, _, content = arg.partition(" ")
            role, content = role.strip().lower(), _unquote(content.strip())
            if role == "user":
                if pending_user is not None:
                    out.notes.append(f"{where}: MESSAGE user follows a user message without an answer; the first "
                                     "is not used")
                pending_user = content
            elif role == "assistant" and pending_user is not None:
                examples.append({"user": pending_user, "assistant": content})
                pending_user = None
            else:
                out.notes.append(f"{where}: MESSAGE {role}: examples are user/assistant pairs; not used")
        elif directive == "TEMPLATE":
            out.notes.append(f"{where}: TEMPLATE: not used; the model's own chat template is kept")
        elif directive == "ADAPTER":
            path = arg if arg.startswith(("/", "~")) or not base else f"{base.rstrip('/')}/{arg.removeprefix('./')}"
            out.persona["adapter"] = path
            out.notes.append(f"{where}: ADAPTER {arg}: a LoRA adapter in GGUF for the daemon's model is needed "
                             f"(Ollama's safetensors adapters are not read); written as {path}")
        elif directive == "LICENSE":
            out.notes.append(f"{where}: LICENSE: kept with the model, not in the persona")
        else:
            out.notes.append(f"{where}: {directive}: unknown directive, not used")
    if pending_user is not None:
        out.notes.append("end: a MESSAGE user without an assistant answer is not used")
    if stops:
        sampling["stop"] = stops
    if sampling:
        out.persona["sampling"] = sampling
    if examples:
        out.persona["examples"] = examples
    if "system_prompt" not in out.persona:
        out.notes.append("no SYSTEM: the persona needs a system prompt; a placeholder was written")
        out.persona["system_prompt"] = "You are a helpful assistant."
    return out


def _directives(text: str, notes: list[str]) -> list[tuple[int, str, str]]:
    """(line, DIRECTIVE, argument) for each instruction; triple-quoted arguments may span lines."""
    out: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        start = i + 1
        i += 1
        if not line or line.startswith("#"):
            continue
        m = re.match(r"(\w+)\s*(.*)$", line)
        if not m:
            notes.append(f"line {start}: not a directive: {line[:40]!r}")
            continue
        directive, arg = m.group(1).upper(), m.group(2)
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body and i < len(lines):
                body += "\n" + lines[i]
                i += 1
            if '"""' not in body:
                notes.append(f"line {start}: {directive}: the triple quote is never closed; read to the end")
            arg = body.split('"""', 1)[0]
        out.append((start, directive, arg.strip()))
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def to_toml(name: str, persona: dict[str, Any]) -> str:
    """The persona as TOML tables under ``[personas.<name>]``."""
    head = f"[personas.{_key(name)}]"
    lines = [head]
    for key, value in persona.items():
        if key not in ("sampling", "examples"):
            lines.append(f"{key} = {_value(value)}")
    if "sampling" in persona:
        lines += ["", f"[personas.{_key(name)}.sampling]"]
        lines += [f"{k} = {_value(v)}" for k, v in persona["sampling"].items()]
    for example in persona.get("examples", []):
        lines += ["", f"[[personas.{_key(name)}.examples]]"]
        lines += [f"{k} = {_value(v)}" for k, v in example.items()]
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string

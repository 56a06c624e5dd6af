"""Ollama Modelfiles as personas: the import command on Modelfiles written as Ollama's documentation shows them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_assistant.cli import main
from edge_assistant.config import load_config
from edge_assistant.modelfile import parse, to_toml
from test_adapters import write_adapter

DOC_STYLE = '''# A machining helper, written the way Ollama's documentation shows Modelfiles.
FROM llama3.2
PARAMETER temperature 0.2
PARAMETER num_ctx 4096
PARAMETER stop "<|eot_id|>"
PARAMETER stop "Operator:"
PARAMETER mirostat 2
PARAMETER num_predict 128
PARAMETER seed 42
SYSTEM """You are the helper of a turning cell.
Answer in two sentences, with "quotes" and a backslash \\\\ kept."""
MESSAGE user What is a collet?
MESSAGE assistant A sleeve that clamps round stock or a tool shank.
TEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>
{{ .System }}<|eot_id|>{{ end }}"""
ADAPTER ./lathe-lora.gguf
FLUX_CAPACITOR on
'''


def test_parse_maps_what_a_persona_carries_and_names_the_rest() -> None:
    got = parse(DOC_STYLE, {"SmolLM2-135M-Instruct.Q4_1.gguf"}, "/srv/personas")
    p = got.persona
    assert p["adapter"] == "/srv/personas/lathe-lora.gguf"  # relative to the Modelfile, as Ollama reads it
    assert p["system_prompt"].startswith("You are the helper of a turning cell.\nAnswer in two sentences")
    assert p["seed"] == 42
    assert p["sampling"] == {"temperature": 0.2, "max_tokens": 128, "stop": ["<|eot_id|>", "Operator:"]}
    assert p["examples"] == [{"user": "What is a collet?",
                              "assistant": "A sleeve that clamps round stock or a tool shank."}]
    notes = "\n".join(got.notes)
    for expected in ("line 2: FROM llama3.2: not in the model directory", "line 4: PARAMETER num_ctx 4096",
                     "line 7: PARAMETER mirostat", "line 14: TEMPLATE: not used", "line 16: ADAPTER ./lathe-lora.gguf",
                     "line 17: FLUX_CAPACITOR: unknown directive"):
        assert expected in notes, notes


def test_toml_round_trip_loads_as_a_persona() -> None:
    got = parse(DOC_STYLE)
    text = to_toml("turning", got.persona)
    table = tomllib.loads(text)["personas"]["turning"]
    assert table == got.persona
    persona = load_config(None, {"personas": {"turning": table}}).personas["turning"]
    assert persona.sampling.stop == ("<|eot_id|>", "Operator:") and persona.seed == 42
    assert '"quotes"' in persona.system_prompt and "\\\\" in persona.system_prompt


@pytest.mark.parametrize(("text", "note"), [
    ("SYSTEM hi\nPARAMETER temperature warm\n", "line 2: PARAMETER temperature 'warm': not a number"),
    ("SYSTEM \"\"\"never closed\n", "triple quote is never closed"),
    ("FROM ./models/x.gguf\n", "no SYSTEM"),
    ("SYSTEM hi\nMESSAGE system be brief\n", "line 2: MESSAGE system"),
])
def test_odd_modelfiles_are_explained(text: str, note: str) -> None:
    assert any(note in n for n in parse(text).notes), parse(text).notes


def test_cli_import_writes_a_persona_the_daemon_answers_with(tmp_path: Path, model_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    mf = tmp_path / "Modelfile"
    mf.write_text(DOC_STYLE)
    write_adapter(tmp_path / "lathe-lora.gguf")  # the Modelfile's ADAPTER, as a GGUF LoRA for this model
    out = tmp_path / "turning.toml"
    assert main(["persona", "import", str(mf), "--name", "turning", "--out", str(out), "--log-level", "ERROR"]) == 0
    err = capsys.readouterr().err
    assert "line 17: FLUX_CAPACITOR" in err and str(out) in err
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[model]\ndir = "{model_path.parent}"\n[mqtt]\nenabled = false\n' + out.read_text())
    assert main(["generate", "--config", str(config_file), "--persona", "turning", "--log-level", "ERROR",
                 "What is a collet?"]) == 0
    assert capsys.readouterr().out.strip()
    bad = tmp_path / "Bad"
    bad.write_text("SYSTEM hi\nPARAMETER seed 0\n")  # seed 0 means random in llama.cpp: the persona refuses it
    assert main(["persona", "import", str(bad), "--name", "b", "--log-level", "ERROR"]) == 78
    assert "seed" in capsys.readouterr().err

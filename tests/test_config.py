"""Configuration: defaults, merging, and errors that name the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge_assistant
from edge_assistant.config import load_config
from edge_assistant.errors import ConfigError


def test_defaults_ship_two_personas() -> None:
    config = load_config()
    assert set(config.personas) == {"factory", "translator"}
    assert config.personas["factory"].sampling.temperature == 0.0
    assert config.personas["translator"].mode == "translate"
    assert len(config.digest) == 64
    assert config.limits.start_timeout_s == 600.0  # start-up is bounded unless a config says otherwise


def test_user_file_merges_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('device_id = "lathe-3"\n[limits]\nqueue_size = 4\n'
                    '[personas.qa]\nsystem_prompt = "You answer QA questions."\nseed = 7\n')
    config = load_config(path)
    assert config.device == "lathe-3"
    assert config.limits.queue_size == 4
    assert config.limits.max_payload_bytes == 16384  # untouched default
    assert set(config.personas) == {"factory", "translator", "qa"}


@pytest.mark.parametrize(("body", "message"), [
    ("[limits]\nqueue_size = 'many'\n", "limits.queue_size: expected an integer, got a string"),
    ("[personas.factory]\nseed = 0\n", "personas.factory.seed: 0 is not usable"),
    ("[personas.factory]\nseed = 4294967295\n", "personas.factory.seed: 4294967295 is not usable"),
    ("[personas.factory.sampling]\ntemperature = -1.0\n", "personas.factory.sampling.temperature: must be 0 or more"),
    ("[personas.factory.sampling]\ntemprature = 0.2\n", "personas.factory.sampling.temprature: unknown key"),
    ("default_persona = 'nobody'\n", "default_persona: 'nobody' is not among the personas"),
    ("[mqtt]\nport = 70000\n", "mqtt.port: 70000 is not a TCP port"),
    ("[mqtt]\nprefix = 'plant/#'\n", "mqtt.prefix: must not contain"),
    ("[mqtt]\nsupport_url = 'wiki.plant'\n", "mqtt.support_url: an http:// or https:// address"),
    ("[mqtt]\nstream_window_ms = -1\n", "mqtt.stream_window_ms: 0 to 5000"),
    ("[personas.factory.knowledge]\nprose_answers = 'summary'\n", "personas.factory.knowledge.prose_answers: "),
    ("[model]\nsha256 = 'abc'\n", "model.sha256: must be 64 hexadecimal digits"),
    ("[model]\nembedding = 'minilm'\n", "model.embedding: must name a .gguf file"),
    ("[profile]\nn_ctx = 'x'\n", "profile.n_ctx: expected an integer"),
    ("[personas.x]\ndescription = 'no prompt'\n", "personas.x.system_prompt: required key is missing"),
    ("[personas.factory]\nexamples = [{user = 'hi'}]\n", r"personas.factory.examples\[0\].assistant: required"),
    ("colour = 'red'\n", "colour: unknown key"),
    ("[personas.factory]\nformat = 'json'\n", "personas.factory.schema: format = \"json\" needs a schema"),
    ("[personas.factory.schema]\ntype = 'object'\nproperties = {code = {type = 'string', pattern = 'A.*'}}\n",
     r"personas.factory.schema: \$.properties.code: not supported by the grammar: pattern"),
    ("[personas.factory]\nschema = '/nonexistent/schema.json'\n", "personas.factory.schema: .*No such file"),
    ("[personas.factory.sampling]\nstop = ['']\n", "personas.factory.sampling.stop: at most 8 strings, none empty"),
    ("[personas.factory]\nadapter_scale = 0.0\n", "personas.factory.adapter_scale: more than 0"),
    ("[[plc]]\ntopic = 'plant/+/alarm'\nformat = 'json'\n", r"plc\[0\].format: persona 'factory' has no schema"),
    ("[limits\n", "not valid TOML"),
    ("[limits]\nstart_timeout_s = 0\n", "limits.start_timeout_s: more than 0, at most 86400"),
    ("[limits]\nstart_timeout_s = 'ten minutes'\n", "limits.start_timeout_s: expected a number"),
])
def test_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert info.value.exit_code == 78


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_policy_modules_import_no_io_library() -> None:
    """Profiles, config, guard rules, prompts, sampling and the MQTT protocol are pure: importing them loads
    neither llama.cpp nor paho, SQLite, audio or psutil."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import edge_assistant.messages, edge_assistant.config, edge_assistant.guard, edge_assistant.personas\n"
            "import edge_assistant.sampling, edge_assistant.profiles, edge_assistant.hardware\n"
            "import edge_assistant.protocol, edge_assistant.plc, edge_assistant.structured, edge_assistant.cpuload\n"
            "import edge_assistant.modelfile\n"
            "print(sorted(m for m in ('llama_cpp', 'paho', 'sqlite3', 'pypdf', 'vosk', 'piper', 'psutil', "
            "'sounddevice') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_config_and_log_level_accepted_after_the_command(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """As people type it: ``edge-assistant run --config FILE`` as well as ``edge-assistant --config FILE run``."""
    from edge_assistant.cli import build_parser, main

    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nqueue_size = 'lots'\n")
    assert main(["detect", "--config", str(bad), "--log-level", "ERROR"]) == 78
    assert "limits.queue_size: expected an integer" in capsys.readouterr().err
    args = build_parser().parse_args(["knowledge", "search", "--config", "x.toml", "--limit", "2", "coolant", "oil"])
    assert (args.config, args.limit, args.text) == ("x.toml", 2, ["coolant", "oil"])
    assert build_parser().parse_args(["--config", "y.toml", "run"]).config == "y.toml"


@pytest.mark.parametrize(("body", "message"), [
    ("[profile]\nparallel = 0\n", "profile.parallel: must be 1 or more"),
    ("[profile]\nparallel = 1000\n", "profile.parallel: 1000 is more than the 256 slots llama.cpp decodes at once"),
    ("[profile]\nn_ctx = 0\n", "profile.n_ctx: must be 1 or more"),
    ("[profile]\nn_batch = 64\nn_ubatch = 128\n", "profile.n_ubatch: 128 is larger than n_batch 64"),
    ("[profile]\ndeterminism = 'loose'\n", "profile.determinism: must be one of 'invariant', 'per-request'"),
])
def test_a_profile_override_out_of_range_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           body: str, message: str) -> None:
    from edge_assistant.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    assert main(["detect", "--config", str(bad), "--log-level", "ERROR"]) == 78
    assert message in capsys.readouterr().err


PATHS = """
import json, edge_assistant, edge_assistant.config as c
print(json.dumps({"package": edge_assistant.__file__, "state": str(c.state_directory()),
                  "index": str(c.KnowledgeConfig().index_path()), "models": str(c.ModelConfig().directory())}))
"""


@pytest.mark.parametrize(("env", "state", "models"), [
    ({}, "home/.local/state/edge-assistant", "home/.local/share/edge-assistant/models"),
    ({"XDG_STATE_HOME": "{tmp}/xdg-state", "XDG_DATA_HOME": "{tmp}/xdg-data"},
     "xdg-state/edge-assistant", "xdg-data/edge-assistant/models"),
    ({"XDG_STATE_HOME": "relative/state"},
     "home/.local/state/edge-assistant", "home/.local/share/edge-assistant/models"),
    ({"STATE_DIRECTORY": "{tmp}/var/lib/edge-assistant"}, "var/lib/edge-assistant", "var/lib/edge-assistant/models"),
    ({"EDGE_ASSISTANT_MODEL_DIR": "{tmp}/checkout/models"}, "home/.local/state/edge-assistant", "checkout/models"),
], ids=["home", "xdg", "relative-xdg-ignored", "systemd", "explicit-models"])
def test_installed_package_keeps_state_and_models_in_their_places(tmp_path: Path, env: dict[str, str], state: str,
                                                                   models: str) -> None:
    """The package imported from a copy, as from site-packages after ``pip install .``: state and models go to
    systemd's directories or the XDG ones, never next to the installed package."""
    site = tmp_path / "lib" / "site-packages"
    shutil.copytree(Path(edge_assistant.__file__).parent, site / "edge_assistant",
                    ignore=shutil.ignore_patterns("__pycache__"))
    clean = {k: v for k, v in os.environ.items()
             if k not in ("EDGE_ASSISTANT_MODEL_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME", "XDG_DATA_HOME")}
    run_env = {**clean, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(site),
               **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
    out = subprocess.run([sys.executable, "-c", PATHS], env=run_env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    paths = json.loads(out.stdout)
    assert Path(paths["package"]).is_relative_to(site)  # the copy was imported, not the checkout
    assert paths["state"] == str(tmp_path / state)
    assert paths["index"] == str(tmp_path / state / "knowledge.sqlite")
    assert paths["models"] == str(tmp_path / models)

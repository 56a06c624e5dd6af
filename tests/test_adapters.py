"""LoRA adapters per persona, with tiny adapters written here with the gguf package against the real model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edge_assistant import app
from edge_assistant.config import load_config
from edge_assistant.errors import ConfigError
from edge_assistant.messages import Request
from edge_assistant.pipeline import handle

Q = "What is a collet?"


def write_adapter(path: Path, arch: str = "llama", n_in: int = 576, n_out: int = 576, size: float = 1.0) -> Path:
    """A rank-1 LoRA delta on the first layer's query weight (SmolLM2-135M: 576 x 576)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 1.0)
    rng = np.random.default_rng(7)
    w.add_tensor("blk.0.attn_q.weight.lora_a", (rng.standard_normal((1, n_in)) * size).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", (rng.standard_normal((n_out, 1)) * size).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def config_with(model_path: Path, adapter: Path) -> dict[str, object]:
    return {"model": {"dir": str(model_path.parent)}, "mqtt": {"enabled": False},
            "personas": {"tuned": {"system_prompt": load_config(None).personas["factory"].system_prompt,
                                   "adapter": str(adapter), "guard": {"strictness": "off"}},
                         "factory": {"guard": {"strictness": "off"}, "knowledge": {"fallback": "model"}}}}


def test_adapter_changes_the_answer_and_switching_back_restores_it(tmp_path: Path, model_path: Path) -> None:
    adapter = write_adapter(tmp_path / "tiny-lora.gguf")
    config = load_config(None, config_with(model_path, adapter))
    runtime = app.load(config, app.plan(config))
    try:
        base = handle(runtime, Request(text=Q, persona="factory", max_tokens=40))
        tuned = handle(runtime, Request(text=Q, persona="tuned", max_tokens=40))
        again = handle(runtime, Request(text=Q, persona="factory", max_tokens=40))
        tuned_again = handle(runtime, Request(text=Q, persona="tuned", max_tokens=40))
    finally:
        runtime.close()
    assert base.status == tuned.status == "ok"
    assert tuned.text != base.text  # the adapter measurably changes the answer
    assert again.text == base.text  # switching back gives the base answer byte for byte
    assert tuned_again.text == tuned.text  # and the adapter's answer is as deterministic
    assert tuned.provenance["adapter_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert "adapter_sha256" not in base.provenance


@pytest.mark.parametrize(("kind", "make"), [
    ("another architecture", lambda p: write_adapter(p, arch="gemma3")),
    ("other shapes", lambda p: write_adapter(p, n_in=100)),
    ("a damaged file", lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00not a gguf") and p),
    ("a missing file", lambda p: p),
])
def test_an_adapter_that_does_not_fit_is_refused_by_name(tmp_path: Path, model_path: Path, kind: str,
                                                        make: object) -> None:
    path = tmp_path / "bad-lora.gguf"
    make(path)  # type: ignore[operator]
    config = load_config(None, config_with(model_path, path))
    with pytest.raises(ConfigError) as err:
        app.load(config, app.plan(config))
    assert "personas.tuned.adapter" in err.value.message and str(path) in err.value.message, kind

"""Model choice on real GGUF files of several quantizations, made here from the default model; bad files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_assistant.errors import (
    ConfigError,
    ModelChecksumError,
    ModelCorruptError,
    ModelMissingError,
    ModelTooLargeError,
)
from edge_assistant.models import COMPUTE_ALLOWANCE, MIB, choose, inspect, scan, slots, verify

ORDER_X86 = ("Q4_K_M", "Q4_0", "Q4_1", "Q8_0")
ORDER_ARM = ("Q4_0", "Q4_K_M", "Q4_1", "Q8_0")
BIG = 16 * 1024 * MIB


def test_headers_of_each_quantization(quantized: dict[str, Path]) -> None:
    for name, path in quantized.items():
        info = inspect(path)
        assert info.quantization == name
        assert info.architecture == "llama"
        assert info.n_layer == 30 and info.n_head == 9 and info.n_head_kv == 3
        assert info.context_length == 8192
        assert info.chat_template
        assert 130e6 < info.parameters < 140e6
    assert inspect(quantized["Q8_0"]).size > inspect(quantized["Q4_0"]).size


@pytest.mark.parametrize(("order", "expected"), [(ORDER_X86, "Q4_K_M"), (ORDER_ARM, "Q4_0"),
                                                 (("Q8_0", "Q4_0"), "Q8_0"), (("IQ2_XS",), "Q4_0")])
def test_profile_order_decides(model_dir_with, order: tuple[str, ...], expected: str) -> None:  # type: ignore[no-untyped-def]
    infos, bad = scan(model_dir_with("Q4_0", "Q4_1", "Q8_0", "Q4_K_M"))
    assert not bad and len(infos) == 4
    choice = choose(infos, order, BIG, 2048)
    assert choice.info.quantization == expected
    assert choice.n_ctx == 2048


def test_preferred_file_too_big_falls_to_next(model_dir_with) -> None:  # type: ignore[no-untyped-def]
    infos, _ = scan(model_dir_with("Q4_0", "Q8_0"))
    q4 = next(i for i in infos if i.quantization == "Q4_0")
    budget = q4.memory_bytes(2048) + MIB  # Q4_0 fits at full context, Q8_0 does not fit at all
    choice = choose(infos, ("Q8_0", "Q4_0"), budget, 2048)
    assert choice.info.quantization == "Q4_0"
    assert any("Q8_0" in r and "budget" in r for r in choice.rejected)


def test_context_shrinks_before_giving_up(model_dir_with) -> None:  # type: ignore[no-untyped-def]
    infos, _ = scan(model_dir_with("Q4_1"))
    info = infos[0]
    budget = info.size + info.kv_bytes(512) + COMPUTE_ALLOWANCE
    choice = choose(infos, ORDER_X86, budget, 4096)
    assert choice.n_ctx == 512
    assert any("shrunk from 4096 to 512" in r for r in choice.reasons)


@pytest.mark.parametrize(("parallel", "determinism", "quant", "offloaded", "expected", "invariant", "why"), [
    (1, "invariant", "Q4_K_M", False, 1, True, "one request decoded at a time"),
    (4, "invariant", "Q4_1", False, 4, True, "Q4_1 on the CPU decodes each answer the same"),
    (4, "invariant", "Q8_0", False, 4, True, "a KV cache per slot"),
    (4, "invariant", "Q4_K_M", False, 1, True, "1 slot, not 4: Q4_K_M was not shown"),
    (4, "per-request", "Q4_K_M", False, 4, False, "determinism is per-request"),
    (2, "invariant", "Q4_0", True, 1, True, "Q4_0 on the GPU was not shown"),
    (2, "per-request", "Q4_0", True, 2, False, "per-request"),
])
def test_slots_only_where_answers_decoded_together_equal_answers_alone(
        parallel: int, determinism: str, quant: str, offloaded: bool, expected: int, invariant: bool,
        why: str) -> None:
    n, inv, reason = slots(parallel, determinism, quant, offloaded)
    assert (n, inv) == (expected, invariant)
    assert why in reason


def test_each_slot_s_kv_cache_counts_in_the_budget(model_dir_with) -> None:  # type: ignore[no-untyped-def]
    infos, _ = scan(model_dir_with("Q4_1", "Q4_K_M"))
    q41 = next(i for i in infos if i.quantization == "Q4_1")
    budget = q41.size + 4 * q41.kv_bytes(2048) + COMPUTE_ALLOWANCE
    four = choose(infos, ("Q4_1",), budget, 2048, parallel=4)
    assert (four.parallel, four.n_ctx, four.invariant) == (4, 2048, True)
    assert any("KV 4 x " in r for r in four.reasons)
    eight = choose(infos, ("Q4_1",), budget, 2048, parallel=8)  # 8 caches fit only at half the context each
    assert (eight.parallel, eight.n_ctx) == (8, 1024)
    assert any("shrunk from 2048 to 1024" in r for r in eight.reasons)
    # Q4_K_M keeps one slot (and so the whole budget for one context) unless determinism is per-request.
    k = choose(infos, ("Q4_K_M",), BIG, 2048, parallel=4)
    assert (k.info.quantization, k.parallel) == ("Q4_K_M", 1)
    assert any("1 slot, not 4" in r for r in k.reasons)
    k = choose(infos, ("Q4_K_M",), BIG, 2048, parallel=4, determinism="per-request")
    assert (k.parallel, k.invariant) == (4, False)


def test_nothing_fits_names_files_and_numbers(model_dir_with) -> None:  # type: ignore[no-untyped-def]
    infos, _ = scan(model_dir_with("Q4_1", "Q8_0"))
    with pytest.raises(ModelTooLargeError) as info:
        choose(infos, ORDER_X86, 50 * MIB, 2048, min_ctx=256)
    msg = info.value.message
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in msg and "SmolLM2-135M-Instruct.Q8_0.gguf" in msg
    assert "budget 50 MiB" in msg
    assert info.value.exit_code == 69


def test_truncated_file(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    with model_path.open("rb") as src, bad.open("wb") as dst:
        dst.write(src.read(50 * MIB))
    with pytest.raises(ModelCorruptError) as info:
        inspect(bad)
    assert str(bad) in info.value.message
    assert "truncated" in info.value.message and str(model_path.stat().st_size) in info.value.message


def test_truncated_header(tmp_path: Path, model_path: Path) -> None:
    bad = tmp_path / "head.gguf"
    bad.write_bytes(model_path.read_bytes()[:4096])
    with pytest.raises(ModelCorruptError, match=r"head.gguf: .*(truncated|past the file end)"):
        inspect(bad)


@pytest.mark.parametrize(("content", "message"), [(b"PK\x03\x04" + b"\0" * 100, "not a GGUF file"),
                                                  (b"GGUF", "too small"),
                                                  (b"GGUF\x07\0\0\0" + b"\0" * 64, "unsupported GGUF version 7"),
                                                  (b"GGUF\x03\0\0\0" + b"\xff" * 16 + b"\0" * 64, "corrupt")])
def test_not_gguf(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelCorruptError, match=message):
        inspect(bad)


def test_scan_skips_bad_files_and_says_why(tmp_path: Path, model_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "good.gguf").symlink_to(model_path)
    (d / "junk.gguf").write_bytes(b"hello world" * 10)
    infos, bad = scan(d)
    assert [i.path.name for i in infos] == ["good.gguf"]
    assert len(bad) == 1 and "junk.gguf" in bad[0] and "not a GGUF file" in bad[0]
    with pytest.raises(ModelMissingError):
        scan(tmp_path / "absent")


def test_checksum(model_path: Path) -> None:
    good = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert verify(model_path, good) == good
    with pytest.raises(ModelChecksumError) as info:
        verify(model_path, "0" * 64)
    assert str(model_path) in info.value.message and good in info.value.message


def test_error_exit_codes_are_distinct() -> None:
    codes = [e.exit_code for e in (ConfigError("x"), ModelCorruptError("x"), ModelMissingError("x"),
                                   ModelChecksumError("x"), ModelTooLargeError("x"))]
    assert len(set(codes)) == len(codes)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_assistant.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)


def test_cli_models_lists_and_explains(model_dir_with) -> None:  # type: ignore[no-untyped-def]
    d = model_dir_with("Q4_0", "Q4_1", "Q8_0", "Q4_K_M")
    out = _cli("models", "--model-dir", str(d), "--profile", "raspberry-pi-5")
    assert out.returncode == 0, out.stderr
    assert "Choice (profile raspberry-pi-5): SmolLM2-135M-Instruct.Q4_0.gguf" in out.stdout
    for q in ("Q4_0", "Q4_1", "Q8_0", "Q4_K_M"):
        assert f"SmolLM2-135M-Instruct.{q}.gguf" in out.stdout


@pytest.mark.parametrize(("setup", "code", "text"), [
    ("empty", 66, "no GGUF model"),
    ("corrupt", 65, "truncated"),  # as the README's table says: a corrupt or truncated file exits 65
    ("badsum", 67, "SHA-256 is"),
    ("no-embedding", 66, "the guard's sentence-embedding model is missing. Run scripts/setup"),
    ("bad-embedding", 65, "embedding.gguf"),
])
def test_cli_exit_codes(tmp_path: Path, model_path: Path, setup: str, code: int, text: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    env: dict[str, str] = {}
    if setup in ("no-embedding", "bad-embedding"):
        (d / model_path.name).symlink_to(model_path)
        config = tmp_path / "c.toml"
        config.write_text(f'[model]\nembedding = "{d / "embedding.gguf"}"\n')
        env["EDGE_ASSISTANT_CONFIG"] = str(config)
        if setup == "bad-embedding":
            (d / "embedding.gguf").write_bytes(b"GGUF" + bytes(60))
    if setup == "corrupt":
        (d / "cut.gguf").write_bytes(model_path.read_bytes()[: 20 * MIB])
    if setup == "badsum":
        shutil.copy(model_path, d / "m.gguf")
        (d / "m.gguf.sha256").write_text("0" * 64 + "  m.gguf\n")
    out = _cli("generate", "--model-dir", str(d), "hello", env=env)
    assert out.returncode == code, out.stderr
    assert text in out.stderr
    assert "Traceback" not in out.stderr


def test_prepare_embeds_the_guard_examples_ahead_of_start(tmp_path: Path, model_path: Path,
                                                          embedding_path: Path) -> None:
    """Set-up runs `prepare`: the embeddings the guard needs are cached beside the embedding model, so the daemon
    does not compute them on its first start."""
    d = tmp_path / "m"
    (d / "embedding").mkdir(parents=True)
    (d / model_path.name).symlink_to(model_path)
    (d / "embedding" / embedding_path.name).symlink_to(embedding_path)
    (d / "embedding" / (embedding_path.name + ".sha256")).symlink_to(embedding_path.with_name(
        embedding_path.name + ".sha256"))
    out = _cli("prepare", "--model-dir", str(d))
    assert out.returncode == 0, out.stderr
    (cache,) = (d / "embedding").glob(f".{embedding_path.name}.*.embeddings.npz")
    assert str(cache) in out.stdout and cache.stat().st_size > 1000

"""Shared fixtures: the real default model, its quantizations, a loaded engine."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_assistant import app
from edge_assistant.config import Config, load_config
from edge_assistant.engine import Engine
from edge_assistant.pipeline import Runtime
from edge_assistant.scheduler import Scheduler

from mqttkit import Broker, Client, DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ROOT / "tests" / "data" / "devices"
# The package does not guess a checkout: the tests name its models/ (fetched by set-up) to it, and to the daemons
# and commands they start.
os.environ.setdefault("EDGE_ASSISTANT_MODEL_DIR", str(ROOT / "models"))
MODEL_DIR = Path(os.environ["EDGE_ASSISTANT_MODEL_DIR"])
DEFAULT_MODEL = MODEL_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDING_MODEL = MODEL_DIR / "embedding" / "all-MiniLM-L6-v2.F16.gguf"
QUANT_CACHE = ROOT / ".cache" / "test-models"


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.fail(f"{DEFAULT_MODEL} is missing: run scripts/setup (it fetches the default model)")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def embedding_path() -> Path:
    """The guard's sentence-embedding model, as set-up converts it."""
    if not EMBEDDING_MODEL.is_file():
        pytest.fail(f"{EMBEDDING_MODEL} is missing: run scripts/setup (it fetches and converts it)")
    return EMBEDDING_MODEL


@pytest.fixture(scope="session")
def quantized(model_path: Path) -> dict[str, Path]:
    """The default model requantized here with llama.cpp's quantize API: Q4_1 (original), Q4_0, Q8_0, Q4_K_M."""
    import llama_cpp

    QUANT_CACHE.mkdir(parents=True, exist_ok=True)
    out = {"Q4_1": model_path}
    for name, ftype in (("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0),
                        ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        dest = QUANT_CACHE / f"SmolLM2-135M-Instruct.{name}.gguf"
        if not dest.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = 2
            tmp = dest.with_suffix(".part")
            rc = llama_cpp.llama_model_quantize(str(model_path).encode(), str(tmp).encode(), ctypes.byref(params))
            assert rc == 0, f"quantize to {name} failed with {rc}"
            tmp.rename(dest)
        out[name] = dest
    return out


@pytest.fixture
def model_dir_with(tmp_path: Path, quantized: dict[str, Path]):  # type: ignore[no-untyped-def]
    """A fresh model directory holding links to the chosen quantizations."""

    def make(*names: str) -> Path:
        d = tmp_path / "models"
        d.mkdir(exist_ok=True)
        for n in names:
            (d / quantized[n].name).symlink_to(quantized[n])
        return d

    return make


@pytest.fixture(scope="session")
def config(model_path: Path) -> Config:
    return load_config(None, {"model": {"dir": str(model_path.parent)}, "mqtt": {"enabled": False}})


@pytest.fixture(scope="session")
def runtime(config: Config) -> Iterator[Runtime]:
    """The real default model, loaded once for the session."""
    rt = app.load(config, app.plan(config))
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def engine(runtime: Runtime) -> Engine:
    assert isinstance(runtime.engine, Engine)
    return runtime.engine


@pytest.fixture(scope="session")
def scheduler(runtime: Runtime) -> Iterator[Scheduler]:
    """The real scheduler over the real model: what every transport submits to."""
    s = Scheduler(runtime)
    s.start()
    yield s
    s.stop()


def copy_device(name: str, dest: Path) -> Path:
    """A writable copy of a recorded device tree."""
    target = dest / name
    shutil.copytree(DEVICES / name, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real Mosquitto (password file, ACL, persistence) on a free port, for one test module."""
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def watcher(broker: Broker) -> Iterator[Client]:
    c = Client(broker)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def stop_daemons_left_running() -> Iterator[None]:
    """A test that fails half-way leaves no daemon process behind (it would hold its model and its port). Daemons
    that serve a whole module were started before the test and stay."""
    before = set(DaemonProcess.running)
    yield
    for daemon in DaemonProcess.running - before:
        daemon.stop()

"""Shared fixtures: the real default model, its quantizations, a loaded engine; and the markers that say which real
parts (the model, a broker, voice, Node-RED) each test needs, found from what it uses."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import inspect
import os
import re
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_assistant import app
from edge_assistant.config import Config, load_config
from edge_assistant.engine import Engine
from edge_assistant.pipeline import Runtime
from edge_assistant.scheduler import Scheduler
from edge_assistant.tomlconf import merge

from fakes import MODEL_ANSWERS
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


# --- markers -------------------------------------------------------------------------------------------------------
# `scripts/test --fast` deselects every test that needs a real part named by a marker; the full run keeps them all,
# and there a missing model is a failure, never a skip. No test needs to carry its markers by hand: a test gets them
# from this file's fixtures it uses, directly or through other fixtures, and from what its code starts (the test, its
# fixtures, and the test helpers and classes they call, read from their source at collection). What that reading
# cannot see is caught when the test runs: building a llama.cpp engine, starting a broker or a daemon without the
# marker fails it.

MODEL_FIXTURES = frozenset({"model_path", "embedding_path", "quantized", "model_dir_with", "config", "runtime",
                            "engine", "scheduler"})
"""This file's fixtures that hold the real model (a test module's own fixture of the same name, a fake, does not)."""
BROKER_FIXTURES = frozenset({"broker", "watcher"})
"""This file's fixtures that hold a real Mosquitto."""
HEAVY_MARKERS = ("model", "broker", "voice", "node_red")
"""What `scripts/test --fast` leaves out (each registered in pyproject.toml)."""
STARTS: dict[str, tuple[tuple[re.Pattern[str], ...], ...]] = {
    # For each marker, what in a test's code starts that part: any one group, all of whose patterns are present.
    "model": ((re.compile(r"^\s*(?:import|from)\s+llama_cpp\b", re.MULTILINE),),
              (re.compile(r"\b(?:DEFAULT_MODEL|EMBEDDING_MODEL)\b"),),
              (re.compile(r"\b(?:app|Engine|LlamaEmbedder)\.load\("),),
              # llama.cpp's own objects, if only around a fake model: they need llama-cpp-python
              (re.compile(r"\b(?:Engine|LlamaEmbedder|SlotDecoder)\("),),
              # the command line where it loads the model: in a daemon (run) or for one answer
              (re.compile(r'"edge_assistant\.cli"'), re.compile(r'"(?:run|generate|listen|prepare)"'))),
    "broker": ((re.compile(r'"mosquitto"'),),),
    "voice": ((re.compile(r"^\s*(?:import|from)\s+(?:vosk|piper|sounddevice)\b", re.MULTILINE),),
              (re.compile(r"\b(?:load_vosk_model|load_piper|default_vosk_model|default_piper_voice)\("),),
              (re.compile(r'"espeak-ng"'),),
              (re.compile(r'"edge_assistant\.cli"'), re.compile(r'"listen"'))),
    "node_red": ((re.compile(r"\bNODE_RED\b"),),),
}
TESTS = Path(__file__).resolve().parent


@functools.cache
def _module_in_tests(name: str) -> bool:
    file = getattr(sys.modules.get(name), "__file__", None)
    return file is not None and Path(file).resolve().parent == TESTS


def _defined_in_tests(obj: object) -> bool:
    return _module_in_tests(getattr(obj, "__module__", None) or "")


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _functions_of(obj: object) -> list[types.FunctionType]:
    if isinstance(obj, types.FunctionType):
        return [obj]
    out = []
    for member in vars(obj).values():
        fn = getattr(member, "__func__", member)  # classmethod, staticmethod
        if isinstance(fn, types.FunctionType):
            out.append(inspect.unwrap(fn))  # as written, not as guarded below
    return out


_FACTS: dict[int, tuple[object, set[str], list[object]]] = {}


def _facts(obj: object) -> tuple[set[str], list[object]]:
    """What the source of ``obj`` (a function or class of the tests) starts by itself, and the tests' functions it
    names and the tests' classes it calls; read once per object."""
    if id(obj) not in _FACTS:
        found: set[str] = set()
        targets: list[object] = []
        try:  # a class is read as its methods (finding a class's own source parses its whole module)
            source = "\n".join(inspect.getsource(fn) for fn in _functions_of(obj))
        except (OSError, TypeError):
            source = ""
        if source:
            found = {marker for marker, groups in STARTS.items()
                     if any(all(p.search(source) for p in group) for group in groups)}
            for fn in _functions_of(obj):
                for name in _global_names(fn.__code__):
                    target = fn.__globals__.get(name)
                    # a class counts where it is called (a daemon started), not where it is only named
                    if isinstance(target, types.FunctionType) or (
                            inspect.isclass(target) and re.search(rf"\b{re.escape(name)}\(", source)):
                        targets.append(target)
        _FACTS[id(obj)] = (obj, found, targets)
    _, found, targets = _FACTS[id(obj)]
    return found, targets


def _started_by(obj: object, seen: set[int]) -> set[str]:
    """The markers whose parts ``obj`` starts, itself or through the tests' functions and classes it uses."""
    obj = inspect.unwrap(obj) if isinstance(obj, types.FunctionType) else obj
    if id(obj) in seen or not _defined_in_tests(obj):
        return set()
    seen.add(id(obj))
    found, targets = _facts(obj)
    out = set(found)
    for target in targets:
        out |= _started_by(target, seen)
    return out


def needs(item: pytest.Item) -> set[str]:
    """The real parts ``item`` needs: from the fixtures it uses (directly or through others) and from its code."""
    found: set[str] = set()
    codes: list[object] = [getattr(item, "function", None)]
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    definitions = fixtureinfo.name2fixturedefs if fixtureinfo is not None else {}
    for name in getattr(item, "fixturenames", ()):
        defs = definitions.get(name)
        if not defs:
            continue
        func = defs[-1].func  # the definition this test gets, after any override
        if inspect.getsourcefile(func) == __file__:
            if name in MODEL_FIXTURES:
                found.add("model")
            if name in BROKER_FIXTURES:
                found.add("broker")
        codes.append(func)
    seen: set[int] = set()
    for code in codes:
        if code is not None:
            found |= _started_by(code, seen)
    return found


@pytest.hookimpl(tryfirst=True)  # before -m selects by them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in sorted(needs(item)):
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)


_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


def _require(marker: str, what: str) -> None:
    """Fail the running test (its setup included) if it starts ``what`` without ``marker``."""
    item = _running[-1] if _running else None
    if item is not None and item.get_closest_marker(marker) is None:
        pytest.fail(f"{item.nodeid} {what} but has no `{marker}` marker, and `scripts/test --fast` would run it: "
                    f"add @pytest.mark.{marker}, or name what starts it in tests/conftest.py STARTS", pytrace=False)


def _guard(owner: type, attr: str, marker: str, what: str) -> None:
    original = owner.__dict__[attr]
    if isinstance(original, classmethod):
        inner: Callable[..., Any] = original.__func__

        @functools.wraps(inner)
        def guarded_cls(cls: type, *args: Any, **kwargs: Any) -> Any:
            _require(marker, what)
            return inner(cls, *args, **kwargs)

        setattr(owner, attr, classmethod(guarded_cls))
    else:
        @functools.wraps(original)
        def guarded(self: object, *args: Any, **kwargs: Any) -> Any:
            _require(marker, what)
            return original(self, *args, **kwargs)

        setattr(owner, attr, guarded)


def pytest_configure(config: pytest.Config) -> None:
    from edge_assistant.engine import LlamaEmbedder
    from edge_assistant.slots import SlotDecoder

    for engine_class in (Engine, LlamaEmbedder, SlotDecoder):  # each one's load builds one
        _guard(engine_class, "__init__", "model", f"builds a llama.cpp {engine_class.__name__}")
    _guard(Broker, "start", "broker", "starts a Mosquitto")
    _guard(DaemonProcess, "start", "model", "starts the daemon (which loads the model)")


def _llama_cpp_missing() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed in this environment (scripts/test --fast makes one without "
                    "it, for the tests that need no model): run scripts/test")



@pytest.fixture(scope="session")
def model_path() -> Path:
    _llama_cpp_missing()
    if not DEFAULT_MODEL.is_file():
        pytest.fail(f"{DEFAULT_MODEL} is missing: run scripts/setup (it fetches the default model)")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def embedding_path() -> Path:
    """The guard's sentence-embedding model, as set-up converts it."""
    _llama_cpp_missing()
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
    return load_config(None, merge(MODEL_ANSWERS, {"model": {"dir": str(model_path.parent)},
                                                   "mqtt": {"enabled": False}}))


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

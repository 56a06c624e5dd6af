"""The markers that keep `scripts/test --fast` to the tests needing no real model, broker, voice or Node-RED."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_assistant.engine import Engine

from conftest import HEAVY_MARKERS, MODEL_FIXTURES, ROOT, _started_by, needs
from fakes import FakeEngine
from mqttkit import Broker, DaemonProcess, module_daemon


def _daemon(config: Path) -> None:
    DaemonProcess(config).start()


def _through_a_helper(broker: Broker, tmp: Any) -> None:
    next(module_daemon(broker, tmp, "dev", ""))


def _a_broker(tmp: Path) -> None:
    Broker(tmp).start()


def _names_a_daemon_only() -> int:
    return len(DaemonProcess.running)


def _fake() -> None:
    FakeEngine().close()


def _quoted() -> str:
    return "import llama_cpp and mosquitto are named here in a string, not used"


CODE = {"daemon": _daemon, "helper": _through_a_helper, "broker": _a_broker, "named": _names_a_daemon_only,
        "fake": _fake, "quoted": _quoted}
"""Held in a table: a test that named them would itself be read as starting what they start."""
ENGINE: dict[str, Any] = {"class": Engine}


@pytest.mark.parametrize(("code", "markers"), [
    ("daemon", {"model"}), ("helper", {"model"}), ("broker", {"broker"}),
    ("named", set()), ("fake", set()), ("quoted", set()),
])
def test_what_a_test_starts_is_read_from_its_code(code: str, markers: set[str]) -> None:
    assert _started_by(CODE[code], set()) == markers


def test_tests_holding_a_model_fixture_carry_the_marker(request: pytest.FixtureRequest) -> None:
    assert needs(request.node) == set() and request.node.get_closest_marker("model") is None
    for item in request.session.items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("model") is None:
            # only a module's own fixture of that name (a fake) may stand in for the real one
            assert "model" not in needs(item), item.nodeid


def test_building_an_engine_without_the_marker_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match="has no `model` marker"):
        ENGINE["class"](None, None, None, "")


def test_the_fast_lane_leaves_out_every_heavy_marker_and_each_is_registered() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    expression = re.search(r'-m "([^"]+)"', script)
    assert expression is not None
    assert re.findall(r"not (\w+)", expression.group(1)) == list(HEAVY_MARKERS)
    with (ROOT / "pyproject.toml").open("rb") as f:
        registered = tomllib.load(f)["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in registered} >= set(HEAVY_MARKERS)

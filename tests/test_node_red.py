"""The example Node-RED flow (examples/node-red) in a real Node-RED, against a real broker and the real daemon.

The flow users import is the flow that runs here; only its broker node's address and credentials are set, as a
user sets them."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from conftest import ROOT
from mqttkit import USERS, Broker, Client, DaemonProcess, free_port, module_daemon

pytestmark = pytest.mark.broker

FLOW = ROOT / "examples" / "node-red" / "edge-assistant.json"
NODE_RED = ROOT / ".cache" / "node-red" / "node_modules" / "node-red" / "red.js"
DEVICE = "nr1"


@pytest.fixture(scope="module")
def daemon(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    yield from module_daemon(broker, tmp_path_factory, DEVICE, "")


@pytest.fixture(scope="module")
def node_red(broker: Broker, daemon: DaemonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not NODE_RED.is_file():
        pytest.fail(f"{NODE_RED} is missing: run scripts/setup (it installs Node-RED)")
    user_dir = tmp_path_factory.mktemp("node-red")
    flow = json.loads(FLOW.read_text())
    for node in flow:
        if node["type"] == "mqtt-broker":
            node["port"] = str(broker.port)
    (user_dir / "flows.json").write_text(json.dumps(flow))
    (user_dir / "flows_cred.json").write_text(json.dumps({"ea-broker": {"user": "client",
                                                                        "password": USERS["client"]}}))
    port = free_port()
    (user_dir / "settings.js").write_text(
        f'module.exports = {{ uiPort: {port}, uiHost: "127.0.0.1", flowFile: "flows.json", credentialSecret: false, '
        'logging: { console: { level: "info" } } };\n')
    log = (user_dir / "node-red.log").open("wb")
    proc = subprocess.Popen(["node", str(NODE_RED), "--settings", str(user_dir / "settings.js"), "--userDir",
                             str(user_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=user_dir,
                            env={**os.environ, "EDGE_DEVICE": DEVICE})
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            text = (user_dir / "node-red.log").read_text(errors="replace")
            if "Connected to broker" in text:
                break
            assert proc.poll() is None, text[-3000:]
            time.sleep(0.2)
        assert "Connected to broker" in text, text[-3000:]
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


def inject(port: int, node: str) -> None:
    """Press an inject node's button, as in the editor (Node-RED's admin API)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/inject/{node}", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_ask_through_the_example_flow(broker: Broker, node_red: int, watcher: Client) -> None:
    watcher.subscribe("edge/node-red/answer")
    watcher.subscribe(f"edge/{DEVICE}/reply/node-red")
    inject(node_red, "ea-ask-inject")
    (panel,) = watcher.wait_for("edge/node-red/answer", timeout=120)
    answer = panel.json()
    assert answer["status"] == "ok" and answer["text"] and answer["error"] is None
    replies = [m for m in watcher.on(f"edge/{DEVICE}/reply/node-red")]
    chunks = [m for m in replies if m.json()["done"] is False]
    final = [m for m in replies if m.json()["done"] is True]
    assert chunks and len(final) == 1 and final[0].json()["text"] == answer["text"]
    assert final[0].correlation and all(m.correlation == final[0].correlation for m in replies)
    # Asked again: a fresh correlation data per question, so it is answered as a new request (the same bytes).
    inject(node_red, "ea-ask-inject")
    again = watcher.wait_for("edge/node-red/answer", count=2, timeout=120)[1].json()
    assert again["text"] == answer["text"] and again["id"] != answer["id"]

"""Answers from the plant's documents end to end: the daemon as a process with the real model, a real Mosquitto,
clients nobody here wrote (mosquitto_rr), the CLI, a PLC gateway, SIGHUP with a new document."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT
from knowledgekit import make_documents
from mqttkit import USERS, Broker, Client, DaemonProcess, module_daemon, write_config

pytestmark = pytest.mark.broker

DEVICE = "kb1"


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = make_documents(tmp_path_factory.mktemp("plant") / "docs")
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <</Type /Catalog\nthis file was cut off")
    return d


@pytest.fixture(scope="module")
def daemon(broker: Broker, docs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    index = tmp_path_factory.mktemp("index") / "index.sqlite"
    yield from module_daemon(broker, tmp_path_factory, DEVICE, f'[knowledge]\npaths = ["{docs}"]\nindex = "{index}"\n'
                             '[[plc]]\ntopic = "plant/+/alarm"\npersona = "factory"\n', model_answers=False)


def rr(broker: Broker, text: str) -> dict[str, Any]:
    out = subprocess.run(["mosquitto_rr", "-p", str(broker.port), "-u", "client", "-P", USERS["client"], "-V", "5",
                          "-t", f"edge/{DEVICE}/request", "-e", f"edge/{DEVICE}/reply/rr", "-m", text, "-W", "90"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_question_answered_with_its_source(broker: Broker, daemon: DaemonProcess) -> None:
    reply = rr(broker, "What gloves do I wear when mixing coolant?")
    assert reply["status"] == "ok" and reply["text"]
    first = reply["sources"][0]
    assert (first["document"], first["location"]) == ("safety.pdf", "page 3")
    assert "nitrile gloves" in first["excerpt"]
    assert len(reply["provenance"]["knowledge_sha256"]) == 64


def test_alarm_code_answered_from_its_row(broker: Broker, daemon: DaemonProcess) -> None:
    reply = rr(broker, "What does alarm 1021 mean?")
    assert reply["status"] == "ok"
    assert reply["text"].startswith("1021 — Coolant pump overload.") and "reset QF7" in reply["text"]
    assert [(s["document"], s["location"]) for s in reply["sources"]] == [("alarms.csv", "row 17 (code 1021)")]
    again = rr(broker, "What does alarm 1021 mean?")
    assert again["text"] == reply["text"]


def test_unknown_alarm_code_is_abstained(broker: Broker, daemon: DaemonProcess) -> None:
    reply = rr(broker, "What does alarm 9999 mean?")
    assert reply["status"] == "refused" and reply["error"]["code"] == "not_in_documents"
    assert "documents do not cover" in reply["text"] and "sources" not in reply


def test_corrupt_pdf_is_skipped_and_the_rest_answers(broker: Broker, daemon: DaemonProcess) -> None:
    log = daemon.text()
    assert "skipped" in log and "broken.pdf" in log and "Traceback" not in log
    assert rr(broker, "What is the plant emergency number?")["sources"][0]["document"] == "safety.pdf"


def test_ask_cli_prints_the_sources(broker: Broker, daemon: DaemonProcess, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "ask.toml", broker, DEVICE).read_text().replace('username = "daemon"',
                                                                                  'username = "client"')
    (tmp_path / "ask.toml").write_text(cfg)
    (tmp_path / "daemon.pw").write_text(USERS["client"] + "\n")
    out = subprocess.run([sys.executable, "-m", "edge_assistant.cli", "ask", "--config", str(tmp_path / "ask.toml"),
                          "--device", DEVICE, "What does alarm HW-4410 mean?"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    assert "HW-4410 — Probe battery low." in out.stdout
    assert "Sources:\n  [1] alarms.csv, row 23 (code HW-4410): code: HW-4410 message: Probe battery low" in out.stdout


def test_plc_alarm_naming_a_row_uses_it(broker: Broker, daemon: DaemonProcess) -> None:
    gw = Client(broker, user="gw1")
    watcher = Client(broker)
    watcher.subscribe("plant/gw1/alarm/explanation")
    try:
        gw.publish("plant/gw1/alarm", json.dumps({"code": "1030", "tag": "CONV1", "alarm": "conveyor stopped"}))
        (msg,) = watcher.wait_for("plant/gw1/alarm/explanation", timeout=90)
        body = msg.json()
        assert body["status"] == "ok" and body["text"].startswith("1030 — Chip conveyor overload.")
        assert body["sources"][0]["location"] == "row 18 (code 1030)"
    finally:
        gw.close()
        watcher.close()


def test_sighup_picks_up_a_new_document(broker: Broker, daemon: DaemonProcess, docs: Path) -> None:
    question = "Who calibrates the torque wrenches?"
    before = rr(broker, question)
    assert before["status"] == "refused" and before["error"]["code"] == "not_in_documents"
    (docs / "shift-notes.md").write_text("# Shift notes\n## Tools\nThe torque wrenches are calibrated by the "
                                         "metrology lab every 12 months; the label shows the next date.\n")
    reloads = daemon.text().count("configuration reloaded")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while daemon.text().count("configuration reloaded") == reloads and time.monotonic() < deadline:
        time.sleep(0.2)
    after = rr(broker, question)
    assert after["status"] == "ok", after
    assert after["sources"][0]["document"] == "shift-notes.md"
    assert after["provenance"]["knowledge_sha256"] != before.get("provenance", {}).get("knowledge_sha256")


def test_generate_json_carries_the_sources(docs: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[knowledge]\npaths = ["{docs}"]\nindex = "{tmp_path / "i.sqlite"}"\n[mqtt]\nenabled = false\n')
    out = subprocess.run([sys.executable, "-m", "edge_assistant.cli", "--config", str(cfg), "generate", "--json",
                          "Which hydraulic oil goes in the hydraulic unit?"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["sources"][0]["document"] == "maintenance.md"
    assert "Hydraulic unit" in reply["sources"][0]["location"]


def test_the_first_question_of_a_fresh_start_is_answered_from_the_example_documents(
        broker: Broker, watcher: Client, tmp_path_factory: pytest.TempPathFactory) -> None:
    """What `scripts/start` runs with no config of its own (examples/start.toml, the example documents of a fictional
    lathe, named relative to the checkout where the daemon runs): the README's first question gets the whole
    procedure, its safety step first, with its source."""
    start = (ROOT / "examples" / "start.toml").read_text()
    daemon = DaemonProcess(write_config(tmp_path_factory.mktemp("start") / "config.toml", broker, "start1", start))
    watcher.subscribe("edge/start1/status")
    daemon.start(wait_online=watcher, device="start1")
    try:
        out = subprocess.run(["mosquitto_rr", "-p", str(broker.port), "-u", "client", "-P", USERS["client"], "-V",
                              "5", "-t", "edge/start1/request", "-e", "edge/start1/reply/rr", "-m",
                              "How do I change the coolant?", "-W", "90"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["status"] == "ok" and reply["grounded"] is True
        steps = [line for line in reply["text"].splitlines() if line[:2].rstrip(".").isdigit()]
        assert steps[0].startswith("1. Switch the main switch OFF and lock it") and steps[-1].startswith("7. ")
        first = reply["sources"][0]
        assert first["document"] == "maintenance_manual.md" and "Changing the coolant" in first["location"]
    finally:
        daemon.stop()


def test_documents_added_by_a_reload_are_retrieved_by_meaning(broker: Broker, watcher: Client, docs: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """A daemon started with nothing that needs the embedding model (no documents, the guard off) gets documents on
    SIGHUP: the reload loads the embedding model with them instead of keeping a runtime without it, so their passages
    are embedded and questions are matched by meaning, not silently by words alone."""
    path = tmp_path_factory.mktemp("reload-docs") / "config.toml"
    guard_off = '[personas.factory.guard]\nstrictness = "off"\n'
    daemon = DaemonProcess(write_config(path, broker, "kb2", guard_off))
    watcher.subscribe("edge/kb2/status")
    daemon.start(wait_online=watcher, device="kb2")
    try:
        assert "units embedded" not in daemon.text()  # nothing to index yet
        write_config(path, broker, "kb2", guard_off + f'[knowledge]\npaths = ["{docs}"]\n')
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "configuration reloaded" not in daemon.text() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = daemon.text()
        assert "configuration reloaded" in log, log[-2000:]
        assert "by their words only" not in log
        embedded = [line for line in log.splitlines() if "units embedded" in line]
        assert embedded and " 0 units embedded" not in embedded[-1], embedded
    finally:
        daemon.stop()

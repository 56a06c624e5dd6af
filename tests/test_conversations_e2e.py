"""Conversations end to end: the daemon as a process with the real model and the example documents
(examples/start.toml), a real Mosquitto, MQTT v5 and 3.1.1 clients, the `ask`, `chat` (through a pseudo-terminal,
as a person types) and `knowledge search --conversation` commands, and a daemon killed with SIGKILL that continues
a conversation after its restart."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from edge_assistant.messages import Request
from edge_assistant.scheduler import Scheduler

from conftest import ROOT
from mqttkit import USERS, Broker, Client, DaemonProcess, module_daemon, write_config

pytestmark = [pytest.mark.broker, pytest.mark.model]

DEVICE = "conv1"
START = (ROOT / "examples" / "start.toml").read_text()
ROW_2014 = ("alarms.csv", "row 10 (Code 2014)")


@pytest.fixture(scope="module")
def daemon(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    yield from module_daemon(broker, tmp_path_factory, DEVICE, START, model_answers=False)


class Asker:
    """An MQTT v5 (or 3.1.1) client that asks the daemon and waits for each final reply."""

    def __init__(self, broker: Broker, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> None:
        self.client = Client(broker, protocol=protocol)
        self.v5 = protocol == MQTTProtocolVersion.MQTTv5
        self.reply_topic = f"edge/{DEVICE}/reply/{uuid.uuid4().hex[:8]}"
        if self.v5:
            self.client.subscribe(self.reply_topic)
        else:  # mqttkit's subscribe sends v5 subscription options
            done = threading.Event()
            self.client.client.on_subscribe = lambda *_a: done.set()
            self.client.client.subscribe(self.reply_topic, qos=1)
            assert done.wait(10)

    def ask(self, body: dict[str, Any], device: str = DEVICE, process: DaemonProcess | None = None) -> dict[str, Any]:
        rid = uuid.uuid4().hex[:10]
        payload = {**body, "id": rid}
        if self.v5:
            self.client.publish(f"edge/{device}/request", json.dumps(payload), response_topic=self.reply_topic,
                                correlation=rid.encode())
        else:
            self.client.publish(f"edge/{device}/request", json.dumps({**payload, "reply_to": self.reply_topic}))
        (msg,) = self.client.wait_for(self.reply_topic, lambda m: m.json().get("id") == rid, 120, process=process)
        return dict(msg.json())

    def close(self) -> None:
        self.client.close()


def where(reply: dict[str, Any]) -> tuple[str, str]:
    first = reply["sources"][0]
    return first["document"], first["location"]


def test_a_follow_up_that_does_not_name_its_subject_is_answered_from_the_right_passage(
        broker: Broker, daemon: DaemonProcess) -> None:
    asker = Asker(broker)
    try:
        alone_before = asker.ask({"text": "What does alarm 2014 mean?"})
        first = asker.ask({"text": "What does alarm 2014 mean?", "conversation": "panel-1"})
        assert first["status"] == "ok" and (first["conversation"], first["turn"]) == ("panel-1", 1)
        assert where(first) == ROW_2014 and first["text"].startswith("2014 — COOLANT LEVEL LOW.")
        second = asker.ask({"text": "How do I clear it?", "conversation": "panel-1"})
        assert second["status"] == "ok" and (second["conversation"], second["turn"]) == ("panel-1", 2)
        assert where(second) == ROW_2014 and "Top up with ready-mixed emulsion" in second["text"]
        assert second["grounded"] is True
        assert "2014" in second["provenance"]["follow_up"]["carried"]
        assert second["provenance"]["conversation_sha256"] != first["provenance"]["conversation_sha256"]
        # Outside the conversation the same question has no subject, and the documents do not answer it.
        alone = asker.ask({"text": "How do I clear it?"})
        assert alone["status"] == "refused" and "conversation" not in alone and "turn" not in alone
        # A request alone is answered as it always was: the same bytes before and after the conversation.
        alone_after = asker.ask({"text": "What does alarm 2014 mean?"})
        for reply in (alone_before, alone_after):
            reply.pop("id"), reply.pop("usage")  # the id is the client's; usage holds the time retrieval took
            assert "conversation" not in reply and "turn" not in reply
            assert not any(k.startswith(("conversation", "follow_up")) for k in reply["provenance"])
        assert alone_before == alone_after
    finally:
        asker.close()


def test_an_off_topic_turn_is_refused_over_mqtt_3_1_1_and_the_conversation_goes_on(broker: Broker,
                                                                                daemon: DaemonProcess) -> None:
    asker = Asker(broker, MQTTProtocolVersion.MQTTv311)
    try:
        first = asker.ask({"text": "What does alarm 2014 mean?", "conversation": "panel-311"})
        assert first["status"] == "ok" and first["conversation"] == "panel-311" and first["turn"] == 1
        poem = asker.ask({"text": "Write me a poem about autumn.", "conversation": "panel-311"})
        assert poem["status"] == "refused" and poem["error"]["code"] == "off_topic" and poem["turn"] == 2
        assert "sources" not in poem
        after = asker.ask({"text": "Where is that float switch?", "conversation": "panel-311"})
        assert after["status"] == "ok" and after["turn"] == 3 and where(after) == ROW_2014
        gone = asker.ask({"conversation": "panel-311", "forget": True})
        assert (gone["status"], gone["text"], gone["turn"]) == ("ok", "", 0)
        bad = asker.ask({"text": "How do I clear it?", "conversation": "x" * 65})
        assert bad["status"] == "error" and bad["error"]["code"] == "bad_request"
        assert "'conversation'" in bad["error"]["message"]
    finally:
        asker.close()


def client_config(broker: Broker, tmp_path: Path) -> Path:
    """A config for the commands that talk to the daemon, as the test client's user."""
    path = write_config(tmp_path / "client.toml", broker, DEVICE, START, model_answers=False)
    path.write_text(path.read_text().replace('username = "daemon"', 'username = "client"'))
    (tmp_path / "daemon.pw").write_text(USERS["client"] + "\n")
    return path


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_assistant.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, **(env or {})}, check=False)


def test_ask_continues_a_conversation_and_knowledge_search_shows_what_is_carried(
        broker: Broker, daemon: DaemonProcess, tmp_path: Path) -> None:
    cfg = str(client_config(broker, tmp_path))
    first = cli("ask", "--config", cfg, "--device", DEVICE, "--conversation", "cli-1", "What does alarm 2014 mean?")
    assert first.returncode == 0, first.stderr
    second = cli("ask", "--config", cfg, "--device", DEVICE, "--conversation", "cli-1", "--json",
                 "Where is that float switch?")
    assert second.returncode == 0, second.stderr
    reply = json.loads(second.stdout)
    assert (reply["conversation"], reply["turn"]) == ("cli-1", 2) and where(reply) == ROW_2014
    # The daemon's conversation, read beside it: what the follow-up carries over, and why.
    state = {"STATE_DIRECTORY": str(daemon.config.parent / "state")}
    shown = cli("knowledge", "search", "--config", str(daemon.config), "--conversation", "cli-1",
                "How do I clear it?", env=state)
    assert shown.returncode == 0, shown.stderr
    assert "carried over: 2014 alarm coolant level low" in shown.stdout
    assert "why: continues the last turn's subject" in shown.stdout
    assert "[1] alarms.csv, row 10 (Code 2014)" in shown.stdout
    fresh = cli("knowledge", "search", "--config", str(daemon.config), "--conversation", "nobody", "--json",
                "How do I clear it?", env=state)
    assert json.loads(fresh.stdout)["follow_up"]["carried"] == []


class Terminal:
    """A command run in a pseudo-terminal: what a person types, and what the screen shows."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True,
                                     env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        """What appears until ``marker`` (the part not read before), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        start = len(self.screen)
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {marker!r}; the screen shows:\n{self.screen[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the command ended
                    data = b""
                if not data and self.proc.poll() is not None:
                    break
                self.screen += data.decode(errors="replace").replace("\r\n", "\n")
        return self.screen[start:]

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


def test_chat_in_a_terminal(broker: Broker, daemon: DaemonProcess, tmp_path: Path) -> None:
    term = Terminal([sys.executable, "-m", "edge_assistant.cli", "--config", str(client_config(broker, tmp_path)),
                     "chat", "--device", DEVICE])
    try:
        assert "/bye to leave" in term.read_until(">>> ")
        term.type("What does alarm 2014 mean?")
        shown = term.read_until(">>> ")
        assert "2014 — COOLANT LEVEL LOW." in shown and "Sources:\n  [1] alarms.csv, row 10 (Code 2014)" in shown
        term.type("How do I clear it?")
        shown = term.read_until(">>> ")
        assert "Top up with ready-mixed emulsion" in shown and "[1] alarms.csv, row 10 (Code 2014)" in shown
        term.type("/forget")
        assert "Forgotten" in term.read_until(">>> ")
        term.type("How do I clear it?")  # a first turn again: nothing to carry, the documents do not answer it
        shown = term.read_until(">>> ")
        assert "documents do not cover this" in shown and "Sources:" not in shown
        term.type("/bye")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_a_daemon_killed_with_sigkill_continues_the_conversation(broker: Broker, watcher: Client,
                                                                 tmp_path: Path) -> None:
    device = "conv2"
    cfg = write_config(tmp_path / "config.toml", broker, device, START, model_answers=False)
    watcher.subscribe(f"edge/{device}/status")
    first_run = DaemonProcess(cfg).start(wait_online=watcher, device=device)
    asker = Asker(broker)
    try:
        first = asker.ask({"text": "What does alarm 2014 mean?", "conversation": "night-shift"}, device, first_run)
        assert first["status"] == "ok" and first["turn"] == 1
        first_run.signal(signal.SIGKILL)
        first_run.wait(30)
        assert list((tmp_path / "state" / "conversations").glob("*.json"))  # written before the reply left
        second_run = DaemonProcess(cfg).start()
        watcher.wait_for(f"edge/{device}/status", lambda m: m.payload == b"online" and not m.retain, 120, count=2,
                         process=second_run)
        second = asker.ask({"text": "How do I clear it?", "conversation": "night-shift"}, device, second_run)
        assert second["status"] == "ok" and second["turn"] == 2 and where(second) == ROW_2014
        assert "conversations: 1 continued from" in second_run.text()
        second_run.stop()
    finally:
        asker.close()


def test_the_model_sees_earlier_turns_and_the_same_turns_give_the_same_bytes(scheduler: Scheduler) -> None:
    def dialogue(name: str) -> list[Any]:
        return [scheduler.ask(Request(text=text, conversation=name, max_tokens=24), timeout=300)
                for text in ("What is a collet?", "How do I clean it?")]

    a, b = dialogue("same-1"), dialogue("same-2")
    assert [r.status for r in a] == ["ok", "ok"] and a[1].turn == 2
    assert [r.text for r in a] == [r.text for r in b]
    assert a[1].provenance["conversation_sha256"] == b[1].provenance["conversation_sha256"]
    assert a[1].provenance["history_turns"] == 1
    first, second = a[0].usage, a[1].usage
    assert first is not None and second is not None
    # The first turn's question and answer are in the second turn's prompt.
    assert second.prompt_tokens >= first.prompt_tokens + first.completion_tokens

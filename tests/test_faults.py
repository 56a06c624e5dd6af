"""Faults against the real parts: a broker killed mid-stream, a daemon killed with requests queued, an exception
inside generation, a voice source that fails, a full disk under the embedding cache, a model file replaced while
serving. Nothing lost, nothing generated twice, every client gets a reply. And what a request carries cannot forge
a log line, nor bring the system prompt into the log."""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge_assistant import service
from edge_assistant.messages import Generation, Message, Request, Sampling
from edge_assistant.mqtt import MqttService
from edge_assistant.pipeline import Runtime
from edge_assistant.scheduler import Scheduler
from edge_assistant.service import setup_logging

from conftest import ROOT
from fakes import FakeClient, FakeEngine, FakeMessage, FakeProps, fake_config, fake_runtime
from mqttkit import Broker, Client, DaemonProcess, started_with_client, write_config

Q = "Spindle 3 shows alarm 1012, coolant pressure low. What should I check first?"


def served(log: str, rid: str) -> int:
    """How often the daemon generated an answer for request ``rid`` (its log line per finished request)."""
    return log.count(f"request {rid} (")


@pytest.mark.broker
def test_broker_killed_mid_stream(broker: Broker, tmp_path: Path, watcher: Client) -> None:
    d, client = started_with_client(broker, tmp_path, watcher, "bk1", "edge/bk1/reply/s", "stream-client")
    try:
        client.publish("edge/bk1/request", json.dumps({
            "text": "Describe, step by step, the complete weekly maintenance of a CNC lathe.", "id": "s1",
            "stream": True, "max_tokens": 400}), response_topic="edge/bk1/reply/s")
        client.wait_for("edge/bk1/reply/s", lambda m: m.json().get("done") is False, timeout=60)
        time.sleep(1.2)  # past the broker's one-second autosave: the sessions are on disk
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait()
        broker.proc = None
        time.sleep(1.0)
        broker.start()
        client.wait_for("edge/bk1/reply/s", lambda m: m.json().get("done") is True, timeout=180)
        time.sleep(2)
    finally:
        d.stop()
    finals = [m.json() for m in client.on("edge/bk1/reply/s") if m.json().get("done") is True]
    client.close()
    assert finals and {f["id"] for f in finals} == {"s1"} and len({f["text"] for f in finals}) == 1
    assert finals[0]["status"] == "ok"
    assert served(d.text(), "s1") == 1  # generated once, whatever QoS 1 delivered twice
    assert "Traceback" not in d.text()


@pytest.mark.broker
def test_daemon_killed_with_ten_requests_queued(broker: Broker, tmp_path: Path, watcher: Client) -> None:
    d, client = started_with_client(broker, tmp_path, watcher, "dk1", "edge/dk1/reply/q", "queue-client")
    for i in range(11):  # one runs, ten wait
        client.publish("edge/dk1/request", json.dumps({"text": f"Question {i}: how do I check the way oil?",
                                                        "id": f"k{i}", "max_tokens": 60 if i == 0 else 12}),
                       response_topic="edge/dk1/reply/q")
    client.wait_for("edge/dk1/reply/q", timeout=120)  # the first is answered, the rest are queued or running
    d.signal(signal.SIGKILL)
    d.wait()
    first = d.text()
    d2 = DaemonProcess(d.config).start(wait_online=watcher, device="dk1")
    try:
        client.wait_for("edge/dk1/reply/q", count=11, timeout=300)
        time.sleep(2)
    finally:
        d2.stop()
    replies = [m.json() for m in client.on("edge/dk1/reply/q")]
    client.close()
    # Every one answered (a reply whose ack died with the process is sent again, the same bytes: QoS 1), and
    # none generated twice: the stored replies outlive the process.
    assert {r["id"] for r in replies} == {f"k{i}" for i in range(11)}
    for i in range(11):
        assert len({json.dumps(r, sort_keys=True) for r in replies if r["id"] == f"k{i}"}) == 1
        assert served(first, f"k{i}") + served(d2.text(), f"k{i}") == 1, i


class Exploding:
    """The real engine, with an exception thrown from inside its token loop on request."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.sha256, self.backend, self.runtime = engine.sha256, engine.backend, engine.runtime
        self.armed = False

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Any = None, cancel: Any = None,
                 deadline: float | None = None) -> Generation:
        count = 0

        def boom(piece: str) -> None:
            nonlocal count
            count += 1
            if self.armed and count == 5:
                raise MemoryError("injected inside generation")
            if on_text is not None:
                on_text(piece)

        return self.engine.generate(messages, sampling, boom, cancel, deadline)  # type: ignore[no-any-return]


@pytest.mark.model
def test_exception_inside_generation_then_the_same_bytes(runtime: Runtime) -> None:
    """The real model throws mid-answer: that request gets ``internal``, and the next one answers exactly as an
    undisturbed daemon would."""
    engine = Exploding(runtime.engine)
    s = Scheduler(replace(runtime, engine=engine, resources=()))
    s.start()
    try:
        before = s.ask(Request(text=Q, max_tokens=40, id="a"))
        engine.armed = True
        broken = s.ask(Request(text=Q, max_tokens=40, id="b"))
        engine.armed = False
        after = s.ask(Request(text=Q, max_tokens=40, id="c"))
    finally:
        s.stop()
    assert broken.status == "error" and broken.error is not None and broken.error.code == "internal"
    assert broken.id == "b" and broken.persona == "factory"
    assert after.status == "ok" and after.text == before.text


@pytest.mark.broker
@pytest.mark.parametrize("mode", ["side_by_side", "release_first"])
def test_model_replaced_by_rename_while_serving_then_sighup(broker: Broker, tmp_path: Path, watcher: Client,
                                                            quantized: dict[str, Path], mode: str) -> None:
    """The model file is replaced by rename (never rewritten in place) while requests run, then SIGHUP: the old
    mapping serves until the swap (or, where memory is short, the old model is released first and requests wait),
    every request is answered once, and the answers name the new file's hash."""
    models = tmp_path / "models"
    models.mkdir()
    target = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copy(quantized["Q4_1"], target)
    cfg = write_config(tmp_path / "c.toml", broker, "mr1")
    cfg.write_text(cfg.read_text().replace(f'dir = "{os.environ.get("EDGE_ASSISTANT_MODEL_DIR", ROOT / "models")}"',
                                           f'dir = "{models}"\nreload = "{mode}"'))
    client = Client(broker)
    client.subscribe("edge/mr1/reply/m")
    watcher.subscribe("edge/mr1/status")
    d = DaemonProcess(cfg).start(wait_online=watcher, device="mr1")
    try:
        def ask(rid: str) -> None:
            client.publish("edge/mr1/request", json.dumps({"text": "How do I check the coolant?", "id": rid,
                                                            "max_tokens": 30}), response_topic="edge/mr1/reply/m")

        ask("old")
        (old,) = client.wait_for("edge/mr1/reply/m", lambda m: m.json()["id"] == "old", timeout=60)
        for i in range(4):
            ask(f"during{i}")
        part = target.with_name(target.name + ".part")
        shutil.copy(quantized["Q8_0"], part)  # another file, same name once renamed
        part.replace(target)
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "configuration reloaded" not in d.text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "configuration reloaded" in d.text(), d.text()[-2000:]
        ask("new")
        client.wait_for("edge/mr1/reply/m", lambda m: m.json()["id"] == "new", timeout=120)
        client.wait_for("edge/mr1/reply/m", count=6, timeout=120)
        time.sleep(1)
    finally:
        d.stop()
    replies = {m.json()["id"]: m.json() for m in client.on("edge/mr1/reply/m")}
    client.close()
    assert sorted(m.json()["id"] for m in client.on("edge/mr1/reply/m")) == sorted(
        ["old", "new", *(f"during{i}" for i in range(4))])
    assert all(r["status"] == "ok" for r in replies.values()), [(r["id"], r.get("error")) for r in replies.values()]
    assert old.json()["provenance"]["quantization"] == "Q4_1"
    assert replies["new"]["provenance"]["quantization"] == "Q8_0"
    assert replies["new"]["provenance"]["model_sha256"] != old.json()["provenance"]["model_sha256"]
    assert "Traceback" not in d.text()
    assert ("released the old model before loading the new one" in d.text()) == (mode == "release_first")


FULL_DISK_PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from edge_assistant import app
from edge_assistant.config import load_config
from edge_assistant.messages import Request
from edge_assistant.scheduler import Scheduler
cfg = load_config(None, {"model": {"dir": sys.argv[1]}, "mqtt": {"enabled": False},
                         "personas": {"factory": {"knowledge": {"fallback": "model"}}}})
s = Scheduler(app.load(cfg, app.plan(cfg)))
s.start()
print(s.ask(Request(text="What is a collet?", max_tokens=8)).status)
print(s.ask(Request(text="Tell me a joke about cats")).status)
s.stop()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare for a tmpfs")
def test_full_disk_under_the_embedding_cache(tmp_path: Path, model_path: Path, embedding_path: Path) -> None:
    """The model directory is a tiny tmpfs, filled up: the guard's embedding cache cannot be written, which is
    logged; the daemon embeds in memory and answers (and refuses) as usual."""
    probe = tmp_path / "probe.py"
    probe.write_text(FULL_DISK_PROBE)
    mnt = tmp_path / "full"
    mnt.mkdir()
    script = f"""set -e
mount -t tmpfs -o size=64k tmpfs {mnt}
ln -s {model_path} {mnt}/{model_path.name}
mkdir {mnt}/embedding
ln -s {embedding_path} {mnt}/embedding/{embedding_path.name}
dd if=/dev/zero of={mnt}/filler bs=4k count=100 2>/dev/null || true
PYTHONPATH={ROOT / "daemon"} {sys.executable} {probe} {mnt}
"""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", "refused"]
    assert "cannot write the embedding cache" in run.stderr and "No space left on device" in run.stderr
    assert "Traceback" not in run.stderr


class FlakySource:
    """A WAV source whose first reading breaks off with an error, as an unplugged device does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rate = inner.rate
        self.opened = 0

    def chunks(self) -> Iterator[bytes]:
        self.opened += 1
        for i, pcm in enumerate(self.inner.chunks()):
            if self.opened == 1 and i == 3:
                raise OSError("input overflowed: device unplugged")
            yield pcm

    def close(self) -> None:
        self.inner.close()


@pytest.mark.model
def test_voice_source_fails_then_speech_is_answered(tmp_path: Path, runtime: Runtime,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Vosk, Piper and model: the audio input fails, the loop says so and starts again, then hears the
    Korean question and speaks the translation."""
    from edge_assistant.voice import WavSink, WavSource
    from edge_assistant.voice import loop as voice_loop
    from edge_assistant.voice.loop import VoiceLoop

    monkeypatch.setattr(voice_loop, "BACKOFF_S", (0.2, 1.0))
    speech = tmp_path / "q.wav"
    subprocess.run(["espeak-ng", "-v", "ko", "-w", str(speech), "컨베이어가 멈췄습니다. 확인해 주세요."], check=True)
    s = Scheduler(runtime)
    s.start()
    status: list[str] = []
    events: list[str] = []
    cfg = replace(runtime.config.voice, enabled=True, activation="always", persona="translator")
    source = FlakySource(WavSource(speech, tail_silence_s=1.5))
    loop = VoiceLoop.load(cfg, runtime.config, s, source, WavSink(tmp_path / "out.wav"),
                          lambda k, _d: events.append(k), status.append)
    done = threading.Thread(target=loop.run)
    done.start()
    done.join(300)
    s.stop()
    assert not done.is_alive()
    assert loop.restarts == 1 and source.opened == 2
    assert any("device unplugged" in line for line in status)
    assert "final" in events and loop.replies and loop.replies[-1].status == "ok"
    assert (tmp_path / "out.wav").stat().st_size > 10000  # the answer was spoken


FORGED = "2026-12-03 08:00:00,000 ERROR edge_assistant.service: FORGED LINE"
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


class Records(logging.Handler):
    """Every record that reached the root logger, after the daemon's own handler (first) saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def daemon_logging() -> Iterator[Records]:
    """The daemon's own logging (``service.setup_logging``) and the records it handled; the root logger's
    handlers and level are put back afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        setup_logging("INFO")
        records = Records()
        root.addHandler(records)
        yield records
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


@pytest.fixture
def daemon_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[io.StringIO, Records]]:
    """The daemon's log as plain stderr lines (not under systemd), written to a buffer."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with daemon_logging() as records:
        yield stream, records


class RaisingEngine(FakeEngine):
    """Fails with the question in its exception's message, as a library error quoting its input would."""

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Any = None, cancel: Any = None,
                 deadline: float | None = None) -> Generation:
        question = messages[-1]["content"]
        if "explode" in question:
            raise ValueError(f"cannot read {question}")
        return super().generate(messages, sampling, on_text, cancel, deadline)


def serve(engine: FakeEngine, messages: list[tuple[str, bytes, FakeProps]]) -> FakeClient:
    """The MQTT service in process (a fake paho client, the real scheduler and pipeline over ``engine``): each
    message handled, every request acknowledged."""
    config = fake_config(device_id="dev1", mqtt={"enabled": True, "discovery": False, "stream_window_ms": 0})
    scheduler = Scheduler(fake_runtime(engine, config), queue_size=8)
    scheduler.start()
    client = FakeClient()
    service = MqttService(config, scheduler, make_client=lambda: client)  # type: ignore[arg-type,return-value]
    try:
        for mid, (topic, payload, props) in enumerate(messages, 1):
            service._on_message(client, None, FakeMessage(topic, payload, mid, 1, props))  # type: ignore[arg-type]
        client.wait(lambda: len(client.acks) >= len(messages))
    finally:
        scheduler.stop(grace_s=1)
    return client


def test_request_values_cannot_forge_log_lines(daemon_log: tuple[io.StringIO, Records]) -> None:
    """An id, correlation data, a topic level or an exception message holding a line break (or a NUL) is written
    escaped: every record is one line that starts with the daemon's own time stamp and level, and the journald
    fields of the record hold no control character either."""
    stream, records = daemon_log
    reply = FakeProps("edge/dev1/reply/log")
    client = serve(RaisingEngine(), [
        ("edge/dev1/request", json.dumps({"text": "What is a collet?", "id": f"x\n{FORGED}"}).encode(), reply),
        ("edge/dev1/request", b"What is a reamer?", FakeProps("edge/dev1/reply/log", b"c\x00\r\n" + FORGED.encode())),
        (f"edge/dev1/request/x\n{FORGED}", b'{"text": 5}', reply),
        ("edge/dev1/request", json.dumps({"text": "explode\n" + FORGED, "id": "boom"}).encode(), reply),
    ])
    finals = [json.loads(p.payload) for p in client.on("edge/dev1/reply/log")]
    assert [f["id"] for f in finals if f["status"] == "ok"] == [f"x\n{FORGED}", "c\x00\r\n" + FORGED]  # echoed
    text = stream.getvalue()
    lines = text.splitlines()
    traceback_lines = [line for line in lines if not RECORD_START.match(line)]
    assert all(line.startswith(("Traceback", "  ")) or line.startswith("ValueError: cannot read explode\\n")
               for line in traceback_lines), traceback_lines  # frames of the one exception logged, its text escaped
    assert len(lines) - len(traceback_lines) == len(records.records)  # one line per record
    assert not [line for line in lines if line.startswith(FORGED)]
    assert "\x00" not in text and "\r" not in text
    assert f"request x\\n{FORGED}" in text and "c\\x00\\r\\n" + FORGED in text  # still there to read
    assert f"bad request on edge/dev1/request/x\\n{FORGED}" in text
    for record in records.records:
        for key, value in vars(record).items():
            if key.isupper() and isinstance(value, str):
                assert value.isprintable(), (key, value)


def test_journald_fields_carry_no_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under systemd each record goes to the journal as fields (``MESSAGE``, ``REQUEST_ID``, ...): what the real
    ``JournalHandler`` that ``setup_logging`` installs would send holds request values only escaped."""
    journal = importlib.import_module("systemd.journal")  # as setup_logging imports it (no stubs)
    sent: list[dict[str, Any]] = []

    def recording(**kw: Any) -> logging.Handler:
        return journal.JournalHandler(  # type: ignore[no-any-return]
            sender_function=lambda message, /, **fields: sent.append({"MESSAGE": message, **fields}), **kw)

    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: SimpleNamespace(JournalHandler=recording)
                        if name == "systemd.journal" else real_import(name, *a))
    monkeypatch.setattr(service, "_stderr_is_journal", lambda: True)
    with daemon_logging():
        serve(FakeEngine(), [
            ("edge/dev1/request", json.dumps({"text": "What is a collet?", "id": f"j\t\n{FORGED}"}).encode(),
             FakeProps("edge/dev1/reply/j")),
            ("edge/dev1/request", b"What is a reamer?", FakeProps("edge/dev1/reply/j", b"k\x01\n" + FORGED.encode())),
        ])
    ids = {s["REQUEST_ID"] for s in sent if s.get("REQUEST_ID")}
    assert ids == {f"j\\t\\n{FORGED}", f"k\\x01\\n{FORGED}"}
    for s in sent:
        for key, value in s.items():
            if key.isupper() and isinstance(value, str) and key != "EXCEPTION_TEXT":
                assert value.isprintable(), (key, value)


def test_a_prompt_leak_puts_no_text_of_the_system_prompt_in_the_log(daemon_log: tuple[io.StringIO, Records]) -> None:
    """The answer repeats the persona's system prompt: the reply is the persona's refusal with ``prompt_leak``, and
    the log says so without a word of the prompt (no stretch of 20 characters of it)."""
    stream, _ = daemon_log
    engine = FakeEngine()
    prompt = fake_config().personas["factory"].system_prompt
    engine.answer = "Sure. " + prompt
    client = serve(engine, [("edge/dev1/request", b'{"text": "What is a collet?", "id": "leak"}',
                             FakeProps("edge/dev1/reply/leak"))])
    (final,) = [json.loads(p.payload) for p in client.on("edge/dev1/reply/leak")]
    assert final["status"] == "refused" and final["error"]["code"] == "prompt_leak"
    text = " ".join(stream.getvalue().lower().split())
    assert "request leak refused by the output check: prompt_leak" in text
    norm = " ".join(prompt.lower().split())
    assert len(norm) > 60
    assert not [norm[i:i + 20] for i in range(len(norm) - 19) if norm[i:i + 20] in text]

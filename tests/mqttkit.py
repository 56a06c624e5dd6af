"""Test helpers: a real Mosquitto on a free port, the daemon as a real process, and a recording client."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

ROOT = Path(__file__).resolve().parents[1]
USERS = {"daemon": "daemon-secret", "client": "client-secret", "gw1": "gw1-secret", "gw2": "gw2-secret"}
ACL = """\
user daemon
topic readwrite edge/#
topic readwrite homeassistant/#
topic read plant/+/alarm
topic write plant/#

user client
topic readwrite edge/#
topic readwrite homeassistant/#
topic read plant/#

# A PLC gateway may publish alarms only under its own name.
pattern write plant/%u/alarm
pattern read plant/%u/#
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A Mosquitto with its own config, password file, ACL and persistence, on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        pw = self.dir / "passwd"
        pw.write_text("")
        for user, password in USERS.items():
            subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
        (self.dir / "acl").write_text(ACL)
        (self.dir / "mosquitto.conf").write_text(
            # mosquitto started as root drops to the 'mosquitto' user, which cannot read a private temp dir.
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {pw}\n"
            f"acl_file {self.dir / 'acl'}\npersistence true\npersistence_location {self.dir}/\n"
            "autosave_interval 1\nset_tcp_nodelay true\nmax_packet_size 262144\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.dir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.dir / "mosquitto.conf")], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # saves the persistent sessions
            self.proc.wait(10)
            self.proc = None


def write_config(path: Path, broker: Broker, device: str = "dev1", extra: str = "", model_answers: bool = True) -> Path:
    """A daemon's config on ``broker``. ``model_answers``: the factory persona answers from the model alone where no
    document covers a question (``fallback = "model"``), as the tests of generation and transport expect; without it
    the persona refuses (``not_in_documents``, or ``no_documents`` when none are configured)."""
    fallback = '\n[personas.factory.knowledge]\nfallback = "model"\n' if model_answers else ""
    model_dir = os.environ.get("EDGE_ASSISTANT_MODEL_DIR", str(ROOT / "models"))
    (path.parent / "daemon.pw").write_text(USERS["daemon"] + "\n")
    path.write_text(f"""device_id = "{device}"
[model]
dir = "{model_dir}"
embedding = "{model_dir}/embedding/all-MiniLM-L6-v2.F16.gguf"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
username = "daemon"
password_file = "{path.parent / 'daemon.pw'}"
client_id = "edge-assistant-{device}"
health_interval_s = 1.0
{extra}{fallback}""")
    return path


class DaemonProcess:
    """``edge-assistant run`` as a real process. Every one started is stopped after its test at the latest
    (``conftest.stop_daemons_left_running``), also when the test fails half-way."""

    running: ClassVar[set[DaemonProcess]] = set()

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        # Each daemon keeps its state (stored replies, the documents' index) beside its config, as systemd's
        # StateDirectory would give it one of its own.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": str(config.parent / "state"),
                    **(env or {})}
        self.log = config.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_online: Client | None = None, device: str = "dev1") -> DaemonProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_assistant.cli", "--config", str(self.config),
                                      "--log-level", "INFO", "run"], stdout=out, stderr=out, env=self.env,
                                     cwd=ROOT)
        DaemonProcess.running.add(self)
        if wait_online is not None:
            wait_online.wait_for(f"edge/{device}/status", lambda m: m.payload == b"online" and not m.retain, 60,
                                 process=self)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        DaemonProcess.running.discard(self)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Received:
    def __init__(self, msg: paho.MQTTMessage) -> None:
        self.topic = msg.topic
        self.payload = bytes(msg.payload)
        self.retain = bool(msg.retain)
        props = getattr(msg, "properties", None)
        self.correlation = getattr(props, "CorrelationData", None)
        self.content_type = getattr(props, "ContentType", None)
        self.received = time.monotonic()

    def json(self) -> Any:
        return json.loads(self.payload)


class Client:
    """A paho v5 test client that records every message it receives."""

    def __init__(self, broker: Broker, user: str = "client", client_id: str = "", persistent: bool = False,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5) -> None:
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.client.username_pw_set(user, USERS[user])
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self._subs: list[str] = []
        connected = threading.Event()

        def on_connect(*_args: Any) -> None:
            self._resubscribe()
            connected.set()

        self.client.on_connect = on_connect
        if protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600 if persistent else 0
            self.client.connect("127.0.0.1", broker.port, clean_start=not persistent, properties=props)
        else:
            self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert connected.wait(10), "test client could not connect"

    def _resubscribe(self) -> None:
        for t in self._subs:
            self.client.subscribe([(t, SubscribeOptions(qos=1))])

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg))
            self._cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self._subs.append(topic)
        self.client.subscribe([(topic, SubscribeOptions(qos=1))])
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes | str, response_topic: str = "", correlation: bytes | None = None,
                expiry: int | None = None, qos: int = 1) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        self.client.publish(topic, payload, qos=qos, properties=props).wait_for_publish(10)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, topic: str, pred: Any = None, timeout: float = 60, count: int = 1,
                 process: DaemonProcess | None = None) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in self.messages if m.topic == topic and (pred is None or pred(m))]
                if len(hits) >= count:
                    return hits
                if process is not None and process.proc is not None and process.proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {process.proc.returncode}:\n{process.text()[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {count} message(s) on {topic}; got {len(hits)}")
                self._cond.wait(min(left, 0.5))

    def finals(self, topic: str) -> list[Any]:
        return [m.json() for m in self.on(topic) if m.json().get("done") is True]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def running(config: Path, watcher: Client, device: str = "dev1") -> Iterator[DaemonProcess]:
    d = DaemonProcess(config)
    watcher.subscribe(f"edge/{device}/status")
    d.start(wait_online=watcher, device=device)
    try:
        yield d
    finally:
        d.stop()


def started_with_client(broker: Broker, tmp_path: Path, watcher: Client, device: str, reply_topic: str,
                        client_id: str) -> tuple[DaemonProcess, Client]:
    """A daemon started and online, and a persistent client subscribed to ``reply_topic``."""
    cfg = write_config(tmp_path / "c.toml", broker, device)
    client = Client(broker, client_id=client_id, persistent=True)
    client.subscribe(reply_topic)
    watcher.subscribe(f"edge/{device}/status")
    return DaemonProcess(cfg).start(wait_online=watcher, device=device), client


def module_daemon(broker: Broker, tmp_path_factory: Any, device: str, extra: str,
                  model_answers: bool = True) -> Iterator[DaemonProcess]:
    """A daemon that serves a whole test module, started once it says it is online (a fixture's body)."""
    cfg = write_config(tmp_path_factory.mktemp(device) / "config.toml", broker, device, extra, model_answers)
    w = Client(broker)
    w.subscribe(f"edge/{device}/status")
    d = DaemonProcess(cfg).start(wait_online=w, device=device)
    w.close()
    yield d
    d.stop()

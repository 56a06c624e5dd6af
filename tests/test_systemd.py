"""The daemon as a systemd service: a real NOTIFY_SOCKET, the watchdog, signals, reload, the unit, the install."""

from __future__ import annotations

import ctypes
import itertools
import json
import mmap
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_assistant import errors, service

from conftest import DEFAULT_MODEL, ROOT
from conftest import EMBEDDING_MODEL as EMBEDDING
from mqttkit import Broker, Client, DaemonProcess, write_config

UNIT = ROOT / "systemd" / "edge-assistant.service"


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket; records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        return [m for _, m in self.messages]

    def wait_for(self, line: str, timeout: float = 60, after: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in enumerate(self.lines()[after:], after):
                if m == line or (line.endswith("*") and m.startswith(line[:-1])):
                    return i
            time.sleep(0.05)
        raise AssertionError(f"no {line!r} on the notify socket; got {self.lines()[-20:]}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def test_notify_sequence_and_sigterm(broker: Broker, tmp_path: Path, notify: NotifySocket) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "sd1")
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    d.start()
    ready = notify.wait_for("READY=1")
    first_wd = notify.wait_for("WATCHDOG=1", after=ready)
    notify.wait_for("WATCHDOG=1", after=first_wd + 1)
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    stopping = notify.wait_for("STOPPING=1")
    lines = notify.lines()
    assert any(m.startswith("STATUS=loading SmolLM2") for m in lines[:ready])
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in lines[:ready])
    assert lines[ready + 1].startswith("STATUS=serving SmolLM2-135M-Instruct.Q4_1.gguf with profile")
    assert ready < first_wd < stopping
    assert not any(m == "WATCHDOG=1" for m in lines[stopping:])


@pytest.mark.parametrize("shadow", [False, True], ids=["systemd-python", "shadowed-package"])
def test_notify_both_import_paths(broker: Broker, tmp_path: Path, notify: NotifySocket, shadow: bool) -> None:
    """systemd-python does the notifying; where a folder named systemd/ shadows it, the socket is used directly."""
    env = {}
    if shadow:
        fake = tmp_path / "shadow" / "systemd"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("")  # a package with no daemon module, first on the path
        env["PYTHONPATH"] = f"{tmp_path / 'shadow'}:{ROOT / 'daemon'}"
    cfg = write_config(tmp_path / "c.toml", broker, "sd2")
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path), **env})
    assert d.proc is None
    d.proc = subprocess.Popen([sys.executable, "-m", "edge_assistant.cli", "--config", str(cfg), "--log-level",
                               "DEBUG", "run"], stdout=d.log.open("ab"), stderr=subprocess.STDOUT, env=d.env,
                              cwd=ROOT)
    notify.wait_for("READY=1")
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    notify.wait_for("STOPPING=1")
    want = "the notify socket directly" if shadow else "systemd-python"
    assert f"sd_notify via {want}" in d.text()


def test_no_notify_socket_is_a_no_op(broker: Broker, tmp_path: Path, watcher: Client) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "sd3")
    watcher.subscribe("edge/sd3/status")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    d = DaemonProcess(cfg)
    d.env = {**env, "PYTHONUNBUFFERED": "1"}
    d.start(wait_online=watcher, device="sd3")
    watcher.subscribe("edge/sd3/reply/n")
    watcher.publish("edge/sd3/request", json.dumps({"text": "What is a collet?", "id": "n1", "max_tokens": 8}),
                    response_topic="edge/sd3/reply/n")
    (reply,) = watcher.wait_for("edge/sd3/reply/n", timeout=60)
    assert reply.json()["status"] == "ok"  # serves without systemd
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0
    assert "Traceback" not in d.text() and "notify" not in d.text().lower()


def test_stalled_generation_stops_watchdog_pings(broker: Broker, tmp_path: Path, notify: NotifySocket,
                                                 watcher: Client) -> None:
    """A generation making no progress past the bound stops WATCHDOG=1; pings resume once it moves again.

    The stall here is real work without a token: evaluating a ~2,000-token prompt takes several seconds on this
    machine, longer than the 1 s bound set for the test.
    """
    cfg = write_config(tmp_path / "c.toml", broker, "wd1",
                       "[limits]\nwatchdog_stall_s = 1.0\n[profile]\nn_ctx = 4096\n"
                       "[personas.factory]\nmax_input_chars = 100000\n")
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000"})
    d.start()
    notify.wait_for("READY=1")
    watcher.subscribe("edge/wd1/reply/w")
    sent = time.monotonic()
    watcher.publish("edge/wd1/request", json.dumps({"text": "coolant pressure alarm " * 500, "max_tokens": 4}),
                    response_topic="edge/wd1/reply/w")
    (reply,) = watcher.wait_for("edge/wd1/reply/w", timeout=120)
    time.sleep(1.0)
    d.stop()
    pings = [t for t, m in notify.messages if m == "WATCHDOG=1" and t > sent]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) > 1.5, gaps  # no pings while stalled
    assert any(t > reply.received for t in pings)  # and they came back
    assert "watchdog pings stopped" in d.text()
    assert any(m.startswith("STATUS=generation stalled") for m in notify.lines())


def test_sigterm_cancels_a_long_generation_within_the_bound(broker: Broker, tmp_path: Path,
                                                            watcher: Client) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "gr1", "[limits]\nstop_grace_s = 0.5\n")
    watcher.subscribe("edge/gr1/status")
    watcher.subscribe("edge/gr1/reply/g")
    d = DaemonProcess(cfg).start(wait_online=watcher, device="gr1")
    watcher.publish("edge/gr1/request", json.dumps({"text": "Describe every step of a spindle rebuild.",
                                                     "id": "long", "max_tokens": 500}),
                    response_topic="edge/gr1/reply/g")
    time.sleep(1.5)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(30) == 0
    assert time.monotonic() - t0 < 10
    (reply,) = watcher.wait_for("edge/gr1/reply/g", timeout=10)
    assert reply.json()["error"]["code"] == "cancelled"
    assert reply.json()["text"]  # what was generated so far is kept
    watcher.wait_for("edge/gr1/status", lambda m: m.payload == b"offline")


def test_sighup_reloads_without_reloading_the_model(broker: Broker, tmp_path: Path, notify: NotifySocket,
                                                     watcher: Client) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "hup1")
    base = cfg.read_text()
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    d.start()
    ready = notify.wait_for("READY=1")
    watcher.subscribe("edge/hup1/reply/h")

    def ask(persona: str, rid: str) -> dict[str, object]:
        watcher.publish(f"edge/hup1/request/{persona}", json.dumps({"text": "What is takt time?", "id": rid,
                                                                    "max_tokens": 8}),
                        response_topic="edge/hup1/reply/h")
        return dict(watcher.wait_for("edge/hup1/reply/h", lambda m: m.json()["id"] == rid, 60)[0].json())

    assert ask("qa", "before")["error"] == {"code": "unknown_persona",
                                             "message": "unknown persona 'qa' (have: factory, translator)"}
    cfg.write_text(base + '\n[personas.qa]\nsystem_prompt = "You answer quality-assurance questions."\nseed = 9\n')
    d.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=ready)
    notify.wait_for("READY=1", after=reloading)
    assert ask("qa", "after")["status"] == "ok"
    assert d.text().count("loaded SmolLM2") == 1  # personas changed, the model stayed loaded

    # A changed profile setting reloads the model.
    cfg.write_text(cfg.read_text().replace('[model]', '[profile]\nn_ctx = 1024\n[model]'))
    d.signal(signal.SIGHUP)
    second = notify.wait_for("RELOADING=1", after=reloading + 1)
    notify.wait_for("READY=1", after=second)
    assert d.text().count("loaded SmolLM2") == 2
    assert ask("factory", "ctx")["status"] == "ok"

    # A broken config is refused and the running one kept.
    cfg.write_text(base + "\n[limits]\nqueue_size = 'lots'\n")
    d.signal(signal.SIGHUP)
    third = notify.wait_for("RELOADING=1", after=second + 1)
    notify.wait_for("READY=1", after=third)
    assert "reload failed, keeping the running configuration" in d.text()
    assert "limits.queue_size: expected an integer" in d.text()
    assert ask("qa", "still")["status"] == "ok"

    # A persona whose LoRA adapter does not fit the model: refused by name, the running configuration kept.
    bad = tmp_path / "bad-lora.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00not a gguf")
    cfg.write_text(base + f'\n[personas.qa]\nsystem_prompt = "QA."\nadapter = "{bad}"\n')
    d.signal(signal.SIGHUP)
    fourth = notify.wait_for("RELOADING=1", after=third + 1)
    notify.wait_for("READY=1", after=fourth)
    assert f"personas.qa.adapter: {bad} is not a LoRA adapter" in d.text()
    assert ask("qa", "kept")["status"] == "ok"
    d.stop()


def test_sighup_to_parallel_slots_answers_at_once_with_the_same_bytes(broker: Broker, tmp_path: Path,
                                                                      notify: NotifySocket, watcher: Client) -> None:
    """A config that turns on slots reloads the model with them; requests sent together then get the answers the
    same requests got one at a time before, byte for byte, and say so in their provenance."""
    cfg = write_config(tmp_path / "c.toml", broker, "par1")
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    d.start()
    ready = notify.wait_for("READY=1")
    watcher.subscribe("edge/par1/reply/#")
    questions = ["What is a collet?", "How do I check the coolant concentration?", "The chip conveyor is jammed."]

    def send(i: int, rid: str) -> None:
        watcher.publish("edge/par1/request", json.dumps({"text": questions[i], "id": rid, "max_tokens": 24}),
                        response_topic=f"edge/par1/reply/{rid}")

    def reply(rid: str) -> dict[str, Any]:
        return dict(watcher.wait_for(f"edge/par1/reply/{rid}", timeout=120)[0].json())

    before = []
    for i in range(3):
        send(i, f"one{i}")
        before.append(reply(f"one{i}"))
    assert {r["provenance"]["parallel"] for r in before} == {1}
    cfg.write_text(cfg.read_text().replace("[model]", "[profile]\nparallel = 3\n[model]"))
    d.signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=ready)
    notify.wait_for("READY=1", after=reloading)
    assert "3 slots of" in d.text()
    for i in range(3):
        send(i, f"three{i}")
    after = [reply(f"three{i}") for i in range(3)]
    d.stop()
    assert all(r["status"] == "ok" for r in after), after
    assert {r["provenance"]["parallel"] for r in after} == {3}
    assert [r["text"] for r in after] == [r["text"] for r in before]


def test_startup_errors_exit_with_their_code(tmp_path: Path, broker: Broker) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "bad1")
    cfg.write_text(cfg.read_text() + "\n[limits]\nqueue_size = 0\n")
    d = DaemonProcess(cfg).start()
    assert d.wait(60) == errors.ConfigError.exit_code
    assert "config_invalid" in d.text() and "Traceback" not in d.text()
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg2 = write_config(tmp_path / "c2.toml", broker, "bad2")
    cfg2.write_text(cfg2.read_text().replace(f'dir = "{DEFAULT_MODEL.parent}"', f'dir = "{empty}"'))
    d2 = DaemonProcess(cfg2).start()
    assert d2.wait(60) == errors.ModelMissingError.exit_code
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nSome text.\n")
    cfg3 = write_config(tmp_path / "c3.toml", broker, "bad3",
                        f'[knowledge]\npaths = ["{docs}"]\nindex = "/proc/edge-assistant/knowledge.sqlite"\n')
    d3 = DaemonProcess(cfg3).start()
    assert d3.wait(120) == errors.KnowledgeError.exit_code
    assert "cannot open the knowledge index" in d3.text() and "Traceback" not in d3.text()


HANG = """
import sys, threading
from edge_assistant import app

def hang(*args, **kwargs):  # a file on a mount that stopped answering: the read never returns
    threading.Event().wait()

setattr(app, sys.argv[1], hang)
from edge_assistant.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.model
@pytest.mark.broker
@pytest.mark.parametrize(("step", "limit"), [("verify", 3), ("build_index", 10)], ids=["model", "documents"])
def test_a_hang_at_start_ends_with_a_restartable_exit(tmp_path: Path, broker: Broker, notify: NotifySocket,
                                                      step: str, limit: int) -> None:
    """Reading the model (its SHA-256 check) or the documents (indexing) never returns: the daemon extends
    systemd's start timeout only up to limits.start_timeout_s, then exits with a code systemd restarts, naming the
    step and the limit; READY=1 never comes."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "alarms.md").write_text("# Alarms\nAlarm 1012: coolant pressure low.\n")
    cfg = write_config(tmp_path / "c.toml", broker, f"hang-{step}",
                       f'[knowledge]\npaths = ["{docs}"]\n[limits]\nstart_timeout_s = {limit}\n')
    probe = tmp_path / "hang.py"
    probe.write_text(HANG)
    d = DaemonProcess(cfg, env={"NOTIFY_SOCKET": str(notify.path)})
    d.proc = subprocess.Popen([sys.executable, str(probe), step, "--config", str(cfg), "--log-level", "INFO", "run"],
                              stdout=d.log.open("ab"), stderr=subprocess.STDOUT, env=d.env, cwd=ROOT)
    DaemonProcess.running.add(d)
    assert d.wait(300) == errors.StartTimeoutError.exit_code
    codes = {int(c) for c in _unit_directives()["RestartPreventExitStatus"][0].split()}
    assert errors.StartTimeoutError.exit_code not in codes and _unit_directives()["Restart"] == ["on-failure"]
    what = ("checking the SHA-256 of SmolLM2-135M-Instruct.Q4_1.gguf" if step == "verify"
            else f"indexing the documents of {docs}")
    message = f"start-up stopped: {what} did not end within limits.start_timeout_s ({limit} s)"
    assert message in d.text() and "Traceback" not in d.text()
    lines = notify.lines()
    failed = next(i for i, m in enumerate(lines) if m.startswith("STATUS=failed: "))
    assert message in lines[failed] and lines[failed + 1] == f"ERRNO={errors.StartTimeoutError.exit_code}"
    assert "READY=1" not in lines
    extends = [(i, int(m.partition("=")[2])) for i, m in enumerate(lines) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends and all(i < failed for i, _ in extends)  # the extensions stopped; the exit came after them
    # None reaches past the limit by more than the time the daemon has to say why it stops.
    assert all(usec <= (limit + service.EXTEND_GRACE_S) * 1e6 for _, usec in extends)


def _unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_file_is_complete() -> None:
    d = _unit_directives()
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and "WatchdogSec" in d and "TimeoutStartSec" in d
    codes = {int(c) for c in d["RestartPreventExitStatus"][0].split()}
    assert codes == {e.exit_code for e in (errors.ConfigError, errors.ModelCorruptError, errors.ModelMissingError,
                                            errors.ModelChecksumError, errors.ModelTooLargeError,
                                            errors.BrokerAuthError, errors.KnowledgeError)}
    assert "network-online.target" in d["After"][0] and "time-sync.target" in d["After"][0]
    for key in ("StateDirectory", "ConfigurationDirectory", "MemoryHigh", "MemoryMax", "CPUWeight"):
        assert key in d, key
    assert d["SupplementaryGroups"] == ["audio"]


def test_unit_verifies_and_scores(tmp_path: Path) -> None:
    unit = tmp_path / "edge-assistant.service"
    exe = Path(sys.executable).with_name("edge-assistant")
    assert exe.exists()
    unit.write_text(UNIT.read_text().replace("/opt/edge-assistant/venv/bin/edge-assistant", str(exe)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    # systemd counts exposure in tenths: --threshold=20 fails the check above an exposure of 2.0.
    sec = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(UNIT)],
                         capture_output=True, text=True, check=False)
    assert sec.returncode == 0, sec.stdout[-2000:]
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
    assert level is not None and float(level.group(1)) <= 2.0
    print(f"systemd-analyze security exposure: {level.group(1)}")


def test_ctypes_and_llama_cpp_tolerate_memory_deny_write_execute() -> None:
    """What MemoryDenyWriteExecute=yes enforces, enforced by the kernel (PR_SET_MDWE) in a child process."""
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.prctl(65, 1, 0, 0, 0) != 0: sys.exit(3)\n"
        "cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)\n"
        "assert cb(1) == 2\n"
        "from edge_assistant import app\n"
        "from edge_assistant.config import load_config\n"
        "from edge_assistant.messages import Request\n"
        "from edge_assistant.scheduler import Scheduler\n"
        f"cfg = load_config(None, {{'model': {{'dir': {str(DEFAULT_MODEL.parent)!r}}}, "
        "'personas': {'factory': {'knowledge': {'fallback': 'model'}}}})\n"
        "s = Scheduler(app.load(cfg, app.plan(cfg)))\n"
        "s.start()\n"
        "r = s.ask(Request(text='What is a collet?', max_tokens=6))\n"
        "s.stop()\n"
        "print(r.status, r.text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode == 3:
        pytest.skip(f"this kernel has no PR_SET_MDWE (errno {ctypes.get_errno()})")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ")


def test_install_into_a_staging_root(tmp_path: Path, model_path: Path) -> None:
    stage = tmp_path / "stage"
    run = subprocess.run(["bash", str(ROOT / "scripts" / "install"), "--root", str(stage), "--model",
                          str(model_path)], capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    exe = stage / "opt/edge-assistant/venv/bin/edge-assistant"
    expected = {
        "opt/edge-assistant/venv/bin/python": None,
        "etc/edge-assistant/config.toml": (ROOT / "systemd/config.example.toml").read_text(),
        "etc/systemd/system/edge-assistant.service": UNIT.read_text(),
        "var/lib/edge-assistant/models/SmolLM2-135M-Instruct.Q4_1.gguf": None,
        "var/lib/edge-assistant/models/SmolLM2-135M-Instruct.Q4_1.gguf.sha256":
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  SmolLM2-135M-Instruct.Q4_1.gguf\n",
        # the guard's sentence-embedding model, converted by the install as by set-up: the same bytes
        "var/lib/edge-assistant/models/embedding/all-MiniLM-L6-v2.F16.gguf.sha256":
            EMBEDDING.with_name(EMBEDDING.name + ".sha256").read_text(),
    }
    for rel, content in expected.items():
        path = stage / rel
        assert path.is_file(), rel
        if content is not None:
            assert path.read_text() == content, rel
    for profile in (ROOT / "hw_profiles").glob("*.toml"):
        assert (stage / "usr/share/edge-assistant/hw_profiles" / profile.name).read_bytes() == profile.read_bytes()
    assert os.access(exe, os.X_OK)
    wants = stage / "etc/systemd/system/multi-user.target.wants/edge-assistant.service"
    assert wants.is_symlink()
    # The staged daemon reads its staged model.
    out = subprocess.run([str(exe), "models", "--json"], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "EDGE_ASSISTANT_MODEL_DIR": str(stage / "var/lib/edge-assistant/models"),
                              "EDGE_ASSISTANT_CONFIG": str(stage / "etc/edge-assistant/config.toml"),
                              "EDGE_ASSISTANT_PROFILES_DIR": str(stage / "usr/share/edge-assistant/hw_profiles")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["choice"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"

    # A second install replaces the model by rename: a process mapping the old file keeps a valid mapping.
    installed = stage / "var/lib/edge-assistant/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    with installed.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        old_inode = os.fstat(fh.fileno()).st_ino
        tail = mapped[-4096:]
        other = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
        shutil.copy(model_path, other)
        again = subprocess.run(["bash", str(ROOT / "scripts" / "install"), "--root", str(stage), "--model",
                                str(other), "--no-enable"], capture_output=True, text=True, timeout=600, check=False)
        assert again.returncode == 0, again.stderr[-2000:]
        assert installed.stat().st_ino != old_inode
        assert mapped[-4096:] == tail  # no SIGBUS, same bytes


JOURNAL_PROBE = """
import logging, os, sys
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from edge_assistant.service import setup_logging
setup_logging("INFO")
assert type(logging.getLogger().handlers[0]).__name__ == "JournalHandler", logging.getLogger().handlers
from edge_assistant import app
from edge_assistant.config import load_config
from edge_assistant.messages import Request
from edge_assistant.scheduler import Scheduler
cfg = load_config(None, {"model": {"dir": sys.argv[1]}, "personas": {"factory": {"knowledge": {"fallback": "model"}}}})
s = Scheduler(app.load(cfg, app.plan(cfg)))
s.start()
s.ask(Request(text="What is a collet?", id="jr-1", max_tokens=5))
s.ask(Request(text="hi", id="jr-2", persona="astrologer"))
s.stop()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not Path("/lib/systemd/systemd-journald")
                    .exists(), reason="needs root, unshare and systemd-journald for a private journal")
def test_journald_gets_structured_fields(tmp_path: Path) -> None:
    """A real systemd-journald, in a private mount namespace so the host's journal is untouched."""
    probe = tmp_path / "probe.py"
    probe.write_text(JOURNAL_PROBE)
    out = tmp_path / "journal.json"
    script = f"""set -e
for d in /run/systemd /run/log /var/log/journal; do mkdir -p $d; mount -t tmpfs tmpfs $d; done
mkdir -p /run/systemd/journal
[ -s /etc/machine-id ] || {{ mount -t tmpfs tmpfs /etc 2>/dev/null || true; }}
/lib/systemd/systemd-journald &
jpid=$!
for i in $(seq 100); do [ -S /run/systemd/journal/socket ] && break; sleep 0.05; done
{sys.executable} {probe} {DEFAULT_MODEL.parent}
sleep 0.5
journalctl -D /run/log/journal -o json --no-pager SYSLOG_IDENTIFIER=edge-assistant > {out}
kill $jpid
"""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    answered = [r for r in records if r.get("REQUEST_ID") == "jr-1"]
    refused = [r for r in records if r.get("REQUEST_ID") == "jr-2"]
    assert answered and refused, (run.stdout[-2000:], run.stderr[-2000:], records[-3:])
    a = answered[0]
    assert a["PERSONA"] == "factory" and int(a["COMPLETION_TOKENS"]) <= 5 and int(a["DURATION_MS"]) > 0
    assert a["PROMPT_TOKENS"] and a["FINISH_REASON"] in ("stop", "length")
    assert refused[0]["ERROR_CODE"] == "unknown_persona"
    assert a["PRIORITY"] == "6"  # info


def test_plain_stderr_without_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from edge_assistant.service import setup_logging

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging("INFO")
    (handler,) = logging.getLogger().handlers
    assert type(handler) is logging.StreamHandler

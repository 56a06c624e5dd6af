"""The daemon's life under systemd: notify, watchdog, journald, signals, reload.

``READY=1`` is sent once the model is loaded and the broker connected; ``WATCHDOG=1`` only while the request loop
makes progress (a generation stuck past its bound stops the pings, and systemd restarts the service);
``STOPPING=1`` on shutdown. Without systemd every notification is a no-op.

Start-up is bounded by ``limits.start_timeout_s``: each step (choosing the model, loading it, indexing the
documents, loading the voice models) runs on a thread of its own while the main thread waits for it, sending
``EXTEND_TIMEOUT_USEC`` that never reach past that bound; a step still running at the bound ends the process with
``StartTimeoutError`` (exit code 75) naming the step, and systemd restarts the service.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from . import app, logsafe
from .config import Config, load_config, state_directory
from .conversations import Conversations
from .errors import EdgeError, StartTimeoutError, VoiceError
from .mqtt import MqttService
from .pipeline import Runtime
from .replystore import MemoryReplies, ReplyStore, SqliteReplies
from .scheduler import Scheduler
from .slots import Call

if TYPE_CHECKING:
    from .voice import VoiceLoop  # imported when voice is on: numpy and the audio stack stay unloaded otherwise

log = logging.getLogger(__name__)

T = TypeVar("T")

EXTEND_GRACE_S = 10.0
"""How far past the start-up bound the last ``EXTEND_TIMEOUT_USEC`` reaches: the time the daemon has to say why it
stops before systemd's own start timeout ends it (the backstop should the process be unable to exit)."""


def _systemd_notify() -> Callable[[str], Any] | None:
    """systemd-python's ``notify``, or None where it cannot be imported.

    A repo-root folder named ``systemd/`` on ``sys.path`` shadows the package: ``import systemd.daemon`` then
    fails with ``ModuleNotFoundError`` or another ``ImportError``, so both are caught.
    """
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    notify = getattr(daemon, "notify", None)
    return notify if callable(notify) else None


class Notifier:
    """Sends sd_notify messages: through systemd-python, else straight to ``$NOTIFY_SOCKET``, else nowhere."""

    def __init__(self) -> None:
        self.socket_path = os.environ.get("NOTIFY_SOCKET", "")
        self._lib = _systemd_notify() if self.socket_path else None
        if self.socket_path:
            log.debug("sd_notify via %s", "systemd-python" if self._lib else "the notify socket directly")
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is set."""
        return bool(self.socket_path)

    def send(self, message: str) -> None:
        """Send one notification (several lines allowed); a no-op without a notify socket."""
        if not self.socket_path:
            return
        if self._lib is not None:
            self._lib(message)
            return
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())

    def status(self, text: str) -> None:
        """``STATUS=`` line for ``systemctl status``."""
        log.info("%s", text)
        self.send(f"STATUS={text}")


class _Extender:
    """Sends ``EXTEND_TIMEOUT_USEC`` every few seconds while a slow start-up step runs; with a ``deadline``
    (``time.monotonic()``) never past it and ``EXTEND_GRACE_S``, and none once it has passed."""

    def __init__(self, notifier: Notifier, deadline: float | None = None, every_s: float = 5.0) -> None:
        self.notifier, self.deadline, self.every_s = notifier, deadline, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="extend-timeout", daemon=True)

    def _extend(self) -> bool:
        """Send one extension; False once the deadline has passed (nothing sent)."""
        usec = self.every_s * 3
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False
            usec = min(usec, left + EXTEND_GRACE_S)
        self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(usec * 1e6)}")
        return True

    def _run(self) -> None:
        while not self._done.wait(self.every_s) and self._extend():
            pass

    def __enter__(self) -> _Extender:
        if self.notifier.enabled and self._extend():
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()


def setup_logging(level: str) -> None:
    """Structured journald records under systemd (``JOURNAL_STREAM`` matches stderr), plain stderr lines otherwise."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler | None = None
    if _stderr_is_journal():
        try:
            journal = importlib.import_module("systemd.journal")
            handler = journal.JournalHandler(SYSLOG_IDENTIFIER="edge-assistant")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(logsafe.install(handler))  # request values are escaped: one record, one line


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    dev, ino = stream.split(":", 1)
    return dev == str(st.st_dev) and ino == str(st.st_ino)


class Daemon:
    """Loads, serves, pings the watchdog, reloads on SIGHUP and stops cleanly on SIGTERM.

    Threads: the main thread handles signals, the watchdog and ``STATUS=``; the scheduler's inference thread owns
    the model; a reload runs on its own thread and hands the new runtime to the scheduler; MQTT has paho's network
    thread and a health thread; voice has its loop and its speaker.
    """

    def __init__(self, config: Config, config_path: Path | None, stall_s: float | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier()
        self.stall_s = stall_s or config.limits.watchdog_stall_s or config.limits.request_timeout_s + 30
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._reloading: threading.Thread | None = None
        self.mqtt: MqttService | None = None
        self.plan: app.Plan | None = None
        self.scheduler: Scheduler | None = None
        self.voice: VoiceLoop | None = None
        self.voice_error = ""
        self.fatal: EdgeError | None = None
        """An error that stopped the daemon after start (the process exits with its code)."""
        self._loaded_file: tuple[str, int, int, int] | None = None
        self._start_deadline = 0.0
        """``time.monotonic()`` by which start-up must have ended (set by ``run``)."""
        self._doing = ""
        """The start-up step running now, as the timeout names it."""

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload.set()
        else:
            self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        n = self.notifier
        self._start_deadline = time.monotonic() + self.config.limits.start_timeout_s
        try:
            n.status("detecting hardware and choosing a model")
            self.plan = self._start_step("detecting the hardware and choosing a model",
                                         lambda: app.plan(self.config, voice=self.config.voice.enabled))
            choice = self.plan.choice
            n.status(f"loading {choice.info.path.name} ({choice.info.quantization}, profile "
                     f"{self.plan.settings.profile})" + (" and indexing the documents" if self.config.knowledge.paths
                                                         else ""))
            plan = self.plan
            runtime = self._start_step(f"loading {choice.info.path.name}",
                                       lambda: app.load(self.config, plan, self._started_step))
        except _StoppedDuringStartError:
            return self._stopped_during_start()
        self._loaded_file = _identity(choice.info.path)
        self.scheduler = Scheduler(runtime, self.config.limits.queue_size, self._reply_store(),
                                   Conversations(self.config.conversations, self.config.conversations.directory()))
        self.scheduler.start()
        try:
            voice = self._make_voice(self.scheduler)  # before the broker: 'online' means every door is open
        except (_StoppedDuringStartError, StartTimeoutError) as exc:
            self.scheduler.stop(grace_s=0.0)  # its thread would keep the process from exiting
            if isinstance(exc, StartTimeoutError):
                raise
            return self._stopped_during_start()
        if self.config.mqtt.enabled:
            n.status(f"connecting to {self.config.mqtt.host}:{self.config.mqtt.port}")
            self.mqtt = self._make_mqtt(self.config)
            with _Extender(n):
                self.mqtt.start(wait_s=60.0)
        self._start_voice(voice)
        n.send("READY=1")
        n.status(self._serving_status())
        return self._loop()

    def _start_step(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread of its own, waited for until the start-up deadline while ``EXTEND_TIMEOUT_USEC``
        keeps systemd waiting too. A step still running at the deadline raises ``StartTimeoutError`` naming it
        (``what``, or the finer step ``fn`` reported last); SIGTERM meanwhile stops the start."""
        self._doing = what
        job = Call(fn)
        worker = threading.Thread(target=job.run, name="start", daemon=True)  # a hung one must not hold the exit
        with _Extender(self.notifier, self._start_deadline):
            worker.start()
            while not job.done.wait(max(0.0, min(self._start_deadline - time.monotonic(), 1.0))):
                if self._stop.is_set():
                    raise _StoppedDuringStartError
                if time.monotonic() >= self._start_deadline:
                    limit = self.config.limits.start_timeout_s
                    raise StartTimeoutError(f"start-up stopped: {self._doing} did not end within "
                                            f"limits.start_timeout_s ({limit:g} s); exiting so that the service "
                                            "is started again")
        return job.outcome()  # type: ignore[no-any-return]

    def _started_step(self, what: str) -> None:
        """A finer start-up step began (called on the start thread)."""
        self._doing = what
        self.notifier.status(what)

    def _stopped_during_start(self) -> int:
        log.info("stopped during start-up, while %s", self._doing)
        self.notifier.send("STOPPING=1")
        return 0

    def _reply_store(self) -> ReplyStore:
        """Replies by request key in the state directory, so a request redelivered after a crash is not generated
        again; in memory when the directory cannot be used."""
        path = state_directory() / "replies.sqlite"
        try:
            return SqliteReplies(path, self.config.limits.remember_replies)
        except (OSError, sqlite3.Error) as exc:
            log.warning("cannot keep replies in %s (%s): remembering them in memory only", path, exc)
            return MemoryReplies(self.config.limits.remember_replies)

    def _make_mqtt(self, config: Config) -> MqttService:
        assert self.plan is not None and self.scheduler is not None
        return MqttService(config, self.scheduler, model=self.plan.choice.info.path.name,
                           profile=self.plan.settings.profile, on_control=self._control)

    def _control(self, command: str) -> None:
        """Control commands other than cancel, from whichever MQTT connection is current."""
        if command == "listen" and self.voice is not None:
            self.voice.push_to_talk()

    def _make_voice(self, scheduler: Scheduler) -> VoiceLoop | None:
        """The voice loop, models loaded; a missing device or model disables voice, nothing else."""
        if not self.config.voice.enabled:
            return None
        from .voice import VoiceLoop, open_sink, open_source

        self.notifier.status("loading the voice models")
        voice = self.config.voice
        try:
            return self._start_step("loading the voice models", lambda: VoiceLoop.load(
                voice, self.config, scheduler, open_source(voice), open_sink(voice), self._voice_event,
                self.notifier.status))
        except VoiceError as exc:
            log.error("voice is off: %s; MQTT keeps serving", exc.message)
            self.voice_error = exc.message
            return None

    def _voice_event(self, kind: str, data: dict[str, Any]) -> None:
        if self.mqtt is not None:
            self.mqtt.publish_voice(kind, data)

    def _start_voice(self, loop: VoiceLoop | None) -> None:
        """Run the voice loop on its own thread (it restarts itself after errors)."""
        if loop is None:
            return
        self.voice = loop
        threading.Thread(target=self._run_voice, args=(loop,), name="voice", daemon=True).start()

    def _run_voice(self, loop: VoiceLoop) -> None:
        try:
            loop.run()
            log.info("voice input ended")
        except Exception:
            log.exception("the voice loop stopped; MQTT keeps serving")

    def _serving_status(self) -> str:
        assert self.plan is not None
        where = (f"on {self.config.mqtt.host}:{self.config.mqtt.port} as {self.config.mqtt.prefix}/"
                 f"{self.config.device}" if self.mqtt else "without MQTT")
        voice = ("; voice on" if self.voice is not None else f"; voice off: {self.voice_error}" if self.voice_error
                 else "")
        rt = self.scheduler.runtime if self.scheduler is not None else None
        docs = (f"; {rt.knowledge.size} document passages" if rt is not None and rt.knowledge is not None else "")
        return (f"serving {self.plan.choice.info.path.name} with profile {self.plan.settings.profile} "
                f"({self.plan.settings.n_threads} threads) {where}{voice}{docs}")

    def healthy(self) -> bool:
        """False when a generation (from MQTT or voice) has made no progress for longer than the stall bound."""
        s = self.scheduler
        return s is None or not (s.busy and time.monotonic() - s.last_progress > self.stall_s)

    def _loop(self) -> int:
        n = self.notifier
        tick = min(n.watchdog_s / 3, 2.0) if n.watchdog_s else 1.0
        stalled_logged = False
        while not self._stop.wait(tick):
            if self.mqtt is not None and self.mqtt.fatal is not None:
                log.error("stopping: %s", self.mqtt.fatal.message)
                n.send("STOPPING=1")
                if self.scheduler is not None:
                    self.scheduler.stop(grace_s=1.0)
                self.mqtt.stop()
                return self.mqtt.fatal.exit_code
            if self._reload.is_set() and (self._reloading is None or not self._reloading.is_alive()):
                self._reload.clear()
                self._reloading = threading.Thread(target=self.reload, name="reload", daemon=True)
                self._reloading.start()
            if self.healthy():
                stalled_logged = False
                if n.watchdog_s:
                    n.send("WATCHDOG=1")
            elif not stalled_logged:
                stalled_logged = True
                log.error("generation stalled for over %.0f s: watchdog pings stopped", self.stall_s)
                n.status("generation stalled: waiting for the watchdog")
        n.send("STOPPING=1")
        n.status("stopping: finishing the current request")
        if self.voice is not None:
            self.voice.stop()
        if self.scheduler is not None:
            self.scheduler.stop(grace_s=self.config.limits.stop_grace_s)
        if self.mqtt is not None:
            self.mqtt.stop()
        log.info("stopped")
        return self.fatal.exit_code if self.fatal is not None else 0

    def reload(self) -> None:
        """Re-read the config and bring the documents' index up to date (on the reload thread).

        Personas, limits, documents and MQTT take effect; the model is loaded again only when the config names
        another one or its file changed (replaced by rename). The new runtime is swapped in between two requests;
        watchdog pings go on meanwhile. A failed reload keeps the running configuration.
        """
        n = self.notifier
        n.send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        scheduler = self.scheduler
        assert scheduler is not None and self.plan is not None, "reload before the model was loaded"
        try:
            new = load_config(self.config_path)
            old = self.config
            plan = app.plan(new, voice=new.voice.enabled)
            current = scheduler.runtime
            same_file = _identity(plan.choice.info.path) == self._loaded_file
            # A config that needs an embedding model the running runtime was built without (relevance turned on,
            # documents added) loads it with the model: reusing the runtime would drop those checks silently.
            embedder_missing = current is not None and current.embedder is None and app.needs_embedder(new)
            if (current is not None and same_file and (new.model, new.profile) == (old.model, old.profile)
                    and not embedder_missing):
                n.status("reloading: configuration and documents")
                knowledge = app.open_knowledge(new, current.embedder)
                runtime = app.build_runtime(new, self.plan, current.engine, current.embedder,  # type: ignore[arg-type]
                                            knowledge)
            else:
                runtime = self._reload_model(new, plan)
                self.plan = plan
                self._loaded_file = _identity(plan.choice.info.path)
            scheduler.swap(runtime)
            scheduler.queue_size = new.limits.queue_size
            self.config = new
            self._reconnect(new, old)
            log.info("configuration reloaded (config %s)", new.digest[:12])
        except EdgeError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc.message)
            n.status(f"reload failed: {exc.message}")
        except Exception:
            log.exception("reload failed with an unexpected error, keeping the running configuration")
        n.send("READY=1")
        n.status(self._serving_status())

    def _reload_model(self, new: Config, plan: app.Plan) -> Runtime:
        """Load the new model: beside the old one when memory allows, else after releasing the old one."""
        assert self.scheduler is not None and self.plan is not None
        n = self.notifier
        old_size = self.plan.choice.info.size
        need = plan.choice.info.size + old_size
        budget = plan.hardware.mem_available * plan.settings.memory_share if plan.hardware.mem_available else 0
        release = new.model.reload == "release_first" or (new.model.reload == "auto" and budget and need > budget)
        if release:
            n.status(f"reloading: releasing the old model, then loading {plan.choice.info.path.name}")
            if not self.scheduler.release(timeout=self.config.limits.request_timeout_s + 10):
                raise EdgeError("the running request did not end; the model was not reloaded")
        else:
            n.status(f"reloading: loading {plan.choice.info.path.name} beside the running model")
        try:
            return app.load(new, plan)
        except EdgeError:
            if release:  # the old model is gone: load it again, or nothing would answer
                log.error("the new model failed to load; loading the previous one again")
                try:
                    self.scheduler.swap(app.load(self.config, self.plan))
                except EdgeError as again:
                    log.critical("the previous model failed to load too (%s): stopping", again.message)
                    self.fatal = again
                    self._stop.set()
            raise

    def _reconnect(self, new: Config, old: Config) -> None:
        if self.mqtt is None:
            return
        if new.mqtt != old.mqtt or new.device != old.device or new.plc != old.plc:
            self.notifier.status("reloading: reconnecting with the new MQTT settings")
            self.mqtt.stop(handover=True)
            self.mqtt = self._make_mqtt(new)
            self.mqtt.start(wait_s=30.0)
        else:
            self.mqtt.config = new


class _StoppedDuringStartError(Exception):
    """SIGTERM or SIGINT arrived while a start-up step ran."""


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    """A model file's identity: replaced by rename, it has another inode (the running process keeps the old one)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def run(config: Config, config_path: Path | None) -> int:
    """Run the daemon; start-up errors exit with the error's code and one clear line."""
    daemon = Daemon(config, config_path)
    try:
        return daemon.run()
    except EdgeError as exc:
        daemon.notifier.send(f"STATUS=failed: {exc.message}\nERRNO={exc.exit_code}")
        raise

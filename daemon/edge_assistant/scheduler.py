"""The one owner of generation: the queue, the request workers, cancel, busy and progress, and the runtime.

Threads and what they own:

- **inference** (this module; with ``parallel`` slots, one per slot: ``inference``, ``inference-2``, ...): the only
  callers of the engine. Each takes the next job from the queue, answers it through ``pipeline.handle`` with the
  current ``Runtime``, and calls the job's ``on_reply`` exactly once. With several, the engine's decode thread
  (``slots.py``) steps their generations together. A new runtime (a reload) is swapped in once every worker is
  between two jobs, and the old one released.
- **transports** (the paho network thread, the voice thread, the CLI) only ``submit``: they never touch the engine.
  ``on_text`` and ``on_reply`` callbacks run on the inference thread and must not block for long.
- **reload** (``service``): builds a new runtime while this one serves, then hands it over with ``swap``; when
  memory is short it first ``release``s the old model, and the queue waits meanwhile.

The conversations (``conversations.Conversations``) are the scheduler's, not a runtime's: a reload keeps them (with
the new runtime's bounds). Only the inference threads read and write them, through ``pipeline.handle``.

Every submitted request gets exactly one final reply: an answer, a refusal, or an error (``busy`` when the queue is
full, ``shutting_down``, ``expired``, ``cancelled``, ``internal`` for a bug, logged with its traceback). A key
(transport-chosen identity: reply topic, correlation data, payload digest) that is still queued or running is not
run twice: the duplicate waits for the same reply. A key answered recently gets the stored reply again.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from . import pipeline
from .conversations import Conversations
from .errors import BusyError, EdgeError, ExpiredError, ShuttingDownError
from .messages import PRIORITY_ALARM, PRIORITY_CHAT, Reply, Request, error_reply
from .pipeline import Runtime
from .replystore import MemoryReplies, ReplyStore

log = logging.getLogger(__name__)

__all__ = ["PRIORITY_ALARM", "PRIORITY_CHAT", "Admission", "Job", "Scheduler"]


ReplyFn = Callable[[Reply], None]
TextFn = Callable[[str], None]
Admission = Literal["queued", "joined", "replayed", "refused"]
"""What ``submit`` did: queued; joined a job with the same key (its reply comes when that job ends); answered at
once from the stored replies; refused (the reply, ``busy`` or ``shutting_down``, was already given)."""


@dataclass(order=True)
class Job:
    """A request waiting for, or held by, the inference thread."""

    priority: int
    """Lower first."""
    seq: int
    """Arrival order within a priority."""
    request: Request = field(compare=False)
    """What to answer."""
    on_reply: ReplyFn = field(compare=False)
    """Called once with the final reply, on the inference thread (or at once when refused)."""
    key: str = field(compare=False, default="")
    """Identity for de-duplication; empty: none."""
    on_text: TextFn | None = field(compare=False, default=None)
    """Streamed pieces of the answer."""
    expires: float | None = field(compare=False, default=None)
    """``time.monotonic()`` after which the request is stale: answered ``expired`` without generating."""
    owner: str = field(compare=False, default="")
    """Which transport submitted it (for ``withdraw``)."""
    cancel: threading.Event = field(compare=False, default_factory=threading.Event)
    """Set to stop it (before it starts, or between tokens)."""
    joined: list[ReplyFn] = field(compare=False, default_factory=list)
    """Duplicates of the same key, told the reply when it is ready."""


class Scheduler:
    """Owns the queue, the inference thread and the runtime. ``start``, then ``submit``; ``stop`` at the end."""

    def __init__(self, runtime: Runtime, queue_size: int = 16, store: ReplyStore | None = None,
                 conversations: Conversations | None = None) -> None:
        self.queue_size = queue_size
        self.conversations = (conversations if conversations is not None
                              else Conversations(runtime.config.conversations))
        """The conversations requests continue (in memory unless the daemon gives a store kept on disk)."""
        self._runtime: Runtime | None = runtime
        self._next: Runtime | None = None
        self._hold = False
        self._heap: list[Job] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._pending: dict[str, Job] = {}
        self._stored: ReplyStore = store if store is not None else MemoryReplies()
        self._running: list[Job] = []
        self._threads: list[threading.Thread] = []
        self._listeners: list[Callable[[], None]] = []
        self.last_progress = time.monotonic()
        """When generation last moved (a job started, or a piece of text came): the watchdog's measure."""
        self.last_tokens_per_s = 0.0
        """Speed of the last answer that generated tokens."""

    # -- state, read from any thread ---------------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime | None:
        """The runtime answering now (None while a reload holds the queue with the old model released)."""
        return self._runtime

    @property
    def busy(self) -> bool:
        """Whether a job is being answered."""
        return bool(self._running)

    @property
    def active(self) -> int:
        """Jobs being answered now (at most the engine's ``parallel`` slots)."""
        return len(self._running)

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one being answered)."""
        with self._cond:
            return len(self._heap)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on the thread that made the change) whenever ``busy`` or ``depth`` changes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("error in a scheduler listener")

    # -- intake, from any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the request workers: one per slot of the runtime's engine."""
        assert self._runtime is not None
        self._add_workers(_slots(self._runtime))

    def _add_workers(self, n: int) -> None:
        while len(self._threads) < n:
            name = "inference" if not self._threads else f"inference-{len(self._threads) + 1}"
            thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def submit(self, request: Request, on_reply: ReplyFn, *, key: str = "", on_text: TextFn | None = None,
               priority: int = PRIORITY_CHAT, expires: float | None = None, owner: str = "",
               on_joined: ReplyFn | None = None) -> Admission:
        """Queue ``request``; ``on_reply`` is called exactly once with its final reply (see ``Admission``).

        A copy of a key already queued or running is not run again: the reply goes to that job's ``on_reply`` once,
        and this copy's ``on_joined`` (default: ``on_reply``) is told it too. A copy of a key answered recently gets
        the stored reply through ``on_joined`` (default: ``on_reply``), or through ``on_reply`` when it was answered
        before a restart. A transport acknowledges a redelivered copy there, and sends the reply again to a client
        that asked again.
        """
        refusal: EdgeError | None = None
        stored: Reply | None = None
        here = False
        with self._cond:
            if self._closed:
                refusal = ShuttingDownError("the daemon is shutting down; the request was not served")
            elif key and key in self._pending:
                log.info("request %s is already queued or running: it gets that reply", key)
                self._pending[key].joined.append(on_joined or on_reply)
                return "joined"
            else:
                stored = self._stored.get(key) if key else None
                here = stored is not None and self._stored.answered_here(key)
            if stored is None and refusal is None:
                if len(self._heap) >= self.queue_size:
                    log.warning("queue full (%d): request %s refused with busy", self.queue_size,
                                request.id or "-")
                    refusal = BusyError(f"the queue is full ({self.queue_size} waiting); try again shortly")
                else:
                    job = Job(priority, next(self._seq), request, on_reply, key, on_text, expires, owner)
                    heapq.heappush(self._heap, job)
                    if key:
                        self._pending[key] = job
                    self._cond.notify_all()
        if stored is not None:
            # Answered by this process: the reply went out (a transport only acknowledges a redelivered copy).
            # Answered before a restart: the reply may have died with the process, so it is sent again.
            log.info("request %s was answered before%s: its stored reply", key, "" if here else " a restart")
            _deliver((on_joined or on_reply) if here else on_reply, stored)
            return "replayed"
        if refusal is not None:
            _deliver(on_reply, error_reply(request.id, refusal.code, refusal.message, request.persona))
            return "refused"
        self._changed()
        return "queued"

    def ask(self, request: Request, on_text: TextFn | None = None, timeout: float | None = None,
            key: str = "") -> Reply:
        """Submit and wait for the reply (the CLI, tests); ``TimeoutError`` if none comes in ``timeout``."""
        done = threading.Event()
        box: list[Reply] = []

        def got(reply: Reply) -> None:
            box.append(reply)
            done.set()

        self.submit(request, got, on_text=on_text, key=key)
        if not done.wait(timeout):
            raise TimeoutError(f"no reply to request {request.id or '-'} within {timeout} s")
        return box[0]

    def cancel(self, key: str = "") -> bool:
        """Cancel the job with ``key`` (queued or running), or every running one when ``key`` is empty."""
        with self._cond:
            jobs = list(self._running) if not key else [self._pending[key]] if key in self._pending else []
            for job in jobs:
                job.cancel.set()
            return bool(jobs)

    def withdraw(self, owner: str) -> list[Job]:
        """Take back the queued jobs of ``owner`` without answering them (a transport handing its requests over
        to its next connection: the broker delivers them again)."""
        with self._cond:
            mine = [j for j in self._heap if j.owner == owner]
            self._heap = [j for j in self._heap if j.owner != owner]
            heapq.heapify(self._heap)
            for j in mine:
                if j.key:
                    self._pending.pop(j.key, None)
        if mine:
            self._changed()
        return sorted(mine)

    # -- runtime swaps, from the reload thread -----------------------------------------------------------------

    def swap(self, runtime: Runtime) -> None:
        """Answer with ``runtime`` once the jobs running now have ended; the old one is released then."""
        with self._cond:
            self._next = runtime
            self._hold = False
            self._cond.notify_all()
            if self._threads:
                self._add_workers(_slots(runtime))

    def release(self, timeout: float | None = None) -> bool:
        """Hold the queue, wait for the running jobs, and release the runtime (before a new model is mapped where
        memory is short). Jobs wait until ``swap``. Returns False if the running jobs did not end in ``timeout``."""
        with self._cond:
            self._hold = True
            if not self._cond.wait_for(lambda: not self._running, timeout):
                self._hold = False
                return False
            old, self._runtime = self._runtime, None
        if old is not None:
            old.close()
            log.info("released the old model before loading the new one")
        return True

    # -- shutdown ----------------------------------------------------------------------------------------------

    def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new jobs, answer queued ones ``shutting_down``, give the running ones ``grace_s`` to finish
        (then cancel them), and end the request workers."""
        with self._cond:
            self._closed = True
            left = sorted(self._heap)
            self._heap.clear()
            self._cond.notify_all()
        for job in left:
            self._finish(job, error_reply(job.request.id, ShuttingDownError.code,
                                          "the daemon is shutting down; the request was not served",
                                          job.request.persona))
        end = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            if self._running:
                log.warning("%d generation(s) did not finish within %.0f s: cancelling", len(self._running), grace_s)
                self.cancel()
            for thread in self._threads:
                thread.join(10)

    # -- the inference thread ----------------------------------------------------------------------------------

    def _take(self) -> tuple[Job, Runtime] | None:
        """The next job and the runtime to answer it with; swaps runtimes once no job runs. None once closed."""
        while True:
            with self._cond:
                while self._next is None or self._running:
                    if (self._next is None and self._heap and not self._hold and self._runtime is not None
                            and len(self._running) < _slots(self._runtime)):
                        job = heapq.heappop(self._heap)
                        self._running.append(job)
                        return job, self._runtime
                    if self._closed:
                        return None
                    self._cond.wait()
                old, self._runtime, self._next = self._runtime, self._next, None
                new = self._runtime
                self.conversations.configure(new.config.conversations)
                self._cond.notify_all()
            if old is not None:
                log.info("runtime swapped between jobs; releasing what the new one does not use")
                old.close(keep=new.resources)

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            job, rt = taken
            self._changed()
            self.last_progress = time.monotonic()
            reply = self._answer(job, rt)
            with self._cond:
                self._running.remove(job)
                self._cond.notify_all()
            self.last_progress = time.monotonic()
            self._finish(job, reply)
            self._changed()

    def _answer(self, job: Job, rt: Runtime) -> Reply:
        request = job.request
        persona = request.persona or rt.config.default_persona
        if job.cancel.is_set():
            return error_reply(request.id, "cancelled", "the request was cancelled before it started", persona)
        if job.expires is not None and time.monotonic() > job.expires:
            log.warning("request %s expired before it was served", request.id or "-")
            return error_reply(request.id, ExpiredError.code, "the request expired before it was served", persona)

        def progress() -> None:
            self.last_progress = time.monotonic()

        on_text = job.on_text
        if on_text is not None:
            on_text = _contained(on_text)
        try:
            reply = pipeline.handle(rt, request, on_text, job.cancel, progress=progress,
                                    conversations=self.conversations)
        except Exception:
            log.exception("request %s failed with an unexpected error", request.id or "-",
                          extra={"REQUEST_ID": request.id, "ERROR_CODE": "internal"})
            return error_reply(request.id, "internal", "an internal error stopped this request; it is logged",
                               persona)
        if reply.usage is not None and reply.usage.tokens_per_s:
            self.last_tokens_per_s = reply.usage.tokens_per_s
        return reply

    def _finish(self, job: Job, reply: Reply) -> None:
        with self._cond:
            if job.key:
                self._pending.pop(job.key, None)
                self._stored.put(job.key, reply)
            joined = list(job.joined)
        _deliver(job.on_reply, reply)
        for fn in joined:
            _deliver(fn, reply)


def _slots(runtime: Runtime) -> int:
    """How many jobs the runtime's engine decodes together."""
    return max(1, int(getattr(runtime.engine, "parallel", 1)))


def _deliver(fn: ReplyFn, reply: Reply) -> None:
    """Hand a reply to a transport; its errors are logged, never raised into the inference thread."""
    try:
        fn(reply)
    except Exception:
        log.exception("error delivering the reply to request %s", reply.id or "-")


def _contained(fn: TextFn) -> TextFn:
    """``fn`` with its errors logged once and swallowed (a broken stream must not stop the answer)."""
    failed = False

    def call(piece: str) -> None:
        nonlocal failed
        if failed:
            return
        try:
            fn(piece)
        except Exception:
            failed = True
            log.exception("error streaming a piece of the answer; the final reply still follows")

    return call

"""The scheduler with a fake generator: one reply per request, duplicates, cancel, expiry, swaps, shutdown.

In-process and fast; the same scheduler runs the real model in test_engine and the daemon tests.
"""

from __future__ import annotations

import threading
import time

import pytest

from edge_assistant.messages import Reply, Request
from edge_assistant.pipeline import Runtime
from edge_assistant.replystore import MemoryReplies, SqliteReplies
from edge_assistant.scheduler import PRIORITY_ALARM, PRIORITY_CHAT, Scheduler

from fakes import FakeEngine, fake_runtime


class Replies:
    """Collects replies per request, to check that each one gets exactly one."""

    def __init__(self) -> None:
        self.got: dict[str, list[Reply]] = {}
        self.cond = threading.Condition()

    def to(self, name: str):  # type: ignore[no-untyped-def]
        def deliver(reply: Reply) -> None:
            with self.cond:
                self.got.setdefault(name, []).append(reply)
                self.cond.notify_all()

        return deliver

    def wait(self, *names: str, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: all(n in self.got for n in names), timeout), (names, self.got)

    def one(self, name: str) -> Reply:
        self.wait(name)
        assert len(self.got[name]) == 1, self.got[name]
        return self.got[name][0]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def sched(engine: FakeEngine):  # type: ignore[no-untyped-def]
    s = Scheduler(fake_runtime(engine), queue_size=3, store=MemoryReplies(4))
    s.start()
    yield s
    s.stop(grace_s=1)


def test_each_request_gets_one_reply_with_its_id_and_persona(sched: Scheduler) -> None:
    r = Replies()
    for i in range(3):
        sched.submit(Request(text=f"question {i}", id=f"q{i}"), r.to(f"q{i}"))
    for i in range(3):
        reply = r.one(f"q{i}")
        assert reply.status == "ok" and reply.id == f"q{i}" and reply.persona == "factory"
        assert reply.text == f"A echo: question {i}"


def test_an_exception_in_generation_is_an_internal_reply_and_serving_goes_on(
        sched: Scheduler, engine: FakeEngine, caplog: pytest.LogCaptureFixture) -> None:
    engine.fail_on = "explode"
    r = Replies()
    sched.submit(Request(text="please explode", id="bad", persona="translator"), r.to("bad"))
    sched.submit(Request(text="then this", id="good"), r.to("good"))
    bad = r.one("bad")
    assert bad.status == "error" and bad.error is not None and bad.error.code == "internal"
    assert bad.id == "bad" and bad.persona == "translator"
    assert r.one("good").status == "ok"
    assert "injected failure" in caplog.text and "Traceback" in caplog.text


def test_full_queue_answers_busy_at_once(sched: Scheduler, engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    r = Replies()
    sched.submit(Request(text="running", id="run"), r.to("run"))
    assert engine.started.wait(5)
    for i in range(3):
        assert sched.submit(Request(text=f"wait {i}", id=f"w{i}"), r.to(f"w{i}")) == "queued"
    assert sched.submit(Request(text="one too many", id="over"), r.to("over")) == "refused"
    over = r.one("over")
    assert over.status == "error" and over.error is not None and over.error.code == "busy" and over.id == "over"
    engine.gate.set()
    for name in ("run", "w0", "w1", "w2"):
        assert r.one(name).status == "ok"


def test_a_key_still_running_is_answered_once_and_the_duplicate_told(sched: Scheduler, engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    r = Replies()
    assert sched.submit(Request(text="q", id="1"), r.to("first"), key="k") == "queued"
    assert engine.started.wait(5)
    assert sched.submit(Request(text="q", id="1"), r.to("dup-reply"), key="k", on_joined=r.to("dup-ack")) == "joined"
    engine.gate.set()
    assert r.one("first").status == "ok"
    r.wait("dup-ack")
    assert r.got["dup-ack"][0] == r.got["first"][0]
    assert "dup-reply" not in r.got  # the reply was sent once
    assert engine.calls == ["q"]


def test_a_key_answered_before_gets_the_stored_reply_again(sched: Scheduler, engine: FakeEngine) -> None:
    r = Replies()
    sched.submit(Request(text="q", id="1"), r.to("a"), key="k")
    first = r.one("a")
    assert sched.submit(Request(text="q", id="1"), r.to("b"), key="k") == "replayed"
    assert r.one("b") == first
    assert engine.calls == ["q"]


def test_the_store_of_answered_keys_is_bounded(sched: Scheduler, engine: FakeEngine) -> None:
    r = Replies()
    for i in range(6):  # remember=4
        sched.submit(Request(text=f"q{i}"), r.to(f"a{i}"), key=f"k{i}")
        r.one(f"a{i}")
    assert sched.submit(Request(text="q0"), r.to("again"), key="k0") == "queued"  # forgotten: answered anew
    r.one("again")
    assert engine.calls.count("q0") == 2


def test_stored_replies_survive_a_restart(tmp_path, engine: FakeEngine) -> None:  # type: ignore[no-untyped-def]
    """A request redelivered after the daemon died (its ack lost) gets the reply it had, not a second run."""
    r = Replies()
    first = Scheduler(fake_runtime(engine), store=SqliteReplies(tmp_path / "replies.sqlite", limit=2))
    first.start()
    first.submit(Request(text="q", id="1"), r.to("a"), key="k")
    answered = r.one("a")
    first.stop()
    engine2 = FakeEngine("B")
    second = Scheduler(fake_runtime(engine2), store=SqliteReplies(tmp_path / "replies.sqlite", limit=2))
    second.start()
    # Answered before the restart: the reply goes out again even to a redelivered copy (it may have been lost).
    assert second.submit(Request(text="q", id="1"), r.to("b"), key="k", on_joined=r.to("ack")) == "replayed"
    assert r.one("b") == answered and engine2.calls == [] and "ack" not in r.got
    for i in range(3):  # the store keeps the newest two
        second.submit(Request(text=f"n{i}"), r.to(f"n{i}"), key=f"n{i}")
        r.one(f"n{i}")
    assert second.submit(Request(text="q", id="1"), r.to("c"), key="k") == "queued"
    second.stop()


def test_cancel_a_queued_and_a_running_request(sched: Scheduler, engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    r = Replies()
    sched.submit(Request(text="long answer " * 5, id="run"), r.to("run"), key="run")
    assert engine.started.wait(5)
    sched.submit(Request(text="waiting", id="wait"), r.to("wait"), key="wait")
    assert sched.cancel("wait") and sched.cancel()  # the queued one by key, the running one
    engine.gate.set()
    for name in ("run", "wait"):
        reply = r.one(name)
        assert reply.status == "error" and reply.error is not None and reply.error.code == "cancelled"
    assert engine.calls == ["long answer " * 5]  # the cancelled queued request never reached the engine


def test_an_expired_request_is_not_generated(sched: Scheduler, engine: FakeEngine) -> None:
    r = Replies()
    sched.submit(Request(text="stale", id="old"), r.to("old"), expires=time.monotonic() - 1)
    reply = r.one("old")
    assert reply.error is not None and reply.error.code == "expired" and engine.calls == []


def test_alarms_go_first(sched: Scheduler, engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    r = Replies()
    sched.submit(Request(text="running"), r.to("run"))
    assert engine.started.wait(5)
    sched.submit(Request(text="chat"), r.to("chat"), priority=PRIORITY_CHAT)
    sched.submit(Request(text="alarm"), r.to("alarm"), priority=PRIORITY_ALARM)
    engine.gate.set()
    r.wait("chat", "alarm")
    assert engine.calls == ["running", "alarm", "chat"]


def test_callback_errors_are_contained(sched: Scheduler, caplog: pytest.LogCaptureFixture) -> None:
    def broken_stream(_piece: str) -> None:
        raise OSError("socket gone")

    def broken_reply(_reply: Reply) -> None:
        raise ValueError("cannot publish")

    sched.submit(Request(text="q1"), broken_reply, on_text=broken_stream)
    r = Replies()
    sched.submit(Request(text="q2", id="next"), r.to("next"))
    assert r.one("next").status == "ok"
    assert "socket gone" in caplog.text and "cannot publish" in caplog.text


def test_swap_between_jobs_releases_only_what_the_new_runtime_does_not_use(sched: Scheduler,
                                                                          engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    r = Replies()
    sched.submit(Request(text="on A"), r.to("a"))
    assert engine.started.wait(5)
    b = FakeEngine("B")
    sched.swap(fake_runtime(b))
    sched.submit(Request(text="on B"), r.to("b"))
    engine.gate.set()
    assert r.one("a").text.startswith("A echo")  # the running job finished on the old runtime
    assert r.one("b").text.startswith("B echo")
    assert engine.closed and not b.closed
    rt = sched.runtime
    assert rt is not None
    shared = Runtime(config=rt.config, engine=b, resources=(b,))
    sched.swap(shared)
    sched.submit(Request(text="still B"), r.to("c"))
    assert r.one("c").text.startswith("B echo") and not b.closed  # the engine was kept, not released


def test_release_holds_the_queue_until_a_new_runtime_arrives(sched: Scheduler, engine: FakeEngine) -> None:
    assert sched.release(timeout=5)
    assert engine.closed and sched.runtime is None
    r = Replies()
    sched.submit(Request(text="waits"), r.to("w"))
    time.sleep(0.2)
    assert "w" not in r.got and sched.depth == 1
    sched.swap(fake_runtime(FakeEngine("N")))
    assert r.one("w").text.startswith("N echo")


def test_stop_answers_queued_requests_shutting_down(engine: FakeEngine) -> None:
    engine.gate = threading.Event()
    s = Scheduler(fake_runtime(engine))
    s.start()
    r = Replies()
    s.submit(Request(text="running", id="run"), r.to("run"))
    assert engine.started.wait(5)
    s.submit(Request(text="queued", id="q"), r.to("q"))
    threading.Timer(0.3, engine.gate.set).start()
    s.stop(grace_s=5)
    assert r.one("run").status == "ok"
    q = r.one("q")
    assert q.error is not None and q.error.code == "shutting_down" and q.id == "q"
    s.submit(Request(text="late", id="late"), r.to("late"))
    late = r.one("late")
    assert late.error is not None and late.error.code == "shutting_down"


def test_busy_and_depth_are_told_when_they_change(sched: Scheduler, engine: FakeEngine) -> None:
    seen: list[tuple[bool, int]] = []
    sched.on_change(lambda: seen.append((sched.busy, sched.depth)))
    r = Replies()
    sched.submit(Request(text="q"), r.to("q"))
    r.one("q")
    time.sleep(0.05)
    assert (True, 0) in seen and seen[-1] == (False, 0)


def _wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_slots_answer_that_many_requests_at_once_and_the_rest_wait() -> None:
    engine = FakeEngine(parallel=3)
    engine.gate = threading.Event()
    s = Scheduler(fake_runtime(engine), queue_size=8)
    before = set(threading.enumerate())
    s.start()
    r = Replies()
    for i in range(5):
        s.submit(Request(text=f"q{i}", id=f"q{i}"), r.to(f"q{i}"))
    assert _wait_for(lambda: len(engine.calls) == 3)
    assert (s.active, s.depth, s.busy) == (3, 2, True)
    assert sorted(t.name for t in set(threading.enumerate()) - before) == ["inference", "inference-2", "inference-3"]
    s.cancel()  # every running request
    engine.gate.set()
    r.wait(*(f"q{i}" for i in range(5)))
    errors = [r.one(f"q{i}").error for i in range(5)]
    codes = [e.code if e else "ok" for e in errors]
    assert codes.count("cancelled") == 3 and codes.count("ok") == 2
    s.stop()


def test_a_swap_waits_for_every_running_request() -> None:
    a = FakeEngine("A", parallel=2)
    a.gate = threading.Event()
    s = Scheduler(fake_runtime(a), queue_size=8)
    before = set(threading.enumerate())
    s.start()
    r = Replies()
    s.submit(Request(text="one"), r.to("one"))
    s.submit(Request(text="two"), r.to("two"))
    assert _wait_for(lambda: len(a.calls) == 2)
    b = FakeEngine("B", parallel=4)
    s.swap(fake_runtime(b))
    s.submit(Request(text="three"), r.to("three"))
    time.sleep(0.2)
    assert "three" not in r.got and not a.closed  # a free worker does not start it on the old runtime
    a.gate.set()
    assert r.one("one").text.startswith("A echo") and r.one("two").text.startswith("A echo")
    assert r.one("three").text.startswith("B echo")
    assert _wait_for(lambda: a.closed)
    assert len(set(threading.enumerate()) - before) == 4  # workers for B's slots
    s.stop()


def test_many_threads_many_requests_each_answered_once() -> None:
    engine = FakeEngine()
    s = Scheduler(fake_runtime(engine), queue_size=1000)
    s.start()
    r = Replies()

    def client(n: int) -> None:
        for i in range(50):
            s.submit(Request(text=f"c{n} q{i}", id=f"{n}-{i}"), r.to(f"{n}-{i}"), key=f"{n}-{i % 25}-{i}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [f"{n}-{i}" for n in range(8) for i in range(50)]
    r.wait(*names, timeout=20)
    assert all(len(r.got[n]) == 1 and r.got[n][0].id == n for n in names)
    s.stop()

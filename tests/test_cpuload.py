"""Threads that give way to other busy processes: the policy, the governor, and the real model's answers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from edge_assistant.cpuload import RECHECK_S, ContextThreads, CpuSample, ThreadGovernor, others_busy, psutil_sampler
from edge_assistant.engine import Engine
from edge_assistant.messages import Sampling
from edge_assistant.profiles import threads_under_load


@pytest.mark.parametrize(("planned", "usable", "others", "expected"), [
    (2, 2, 0.0, 2),    # a quiet 2-core machine: both cores
    (2, 2, 0.3, 2),    # MQTT and housekeeping elsewhere: not a CPU's worth
    (2, 2, 0.5, 1),    # half a CPU taken: the threads would wait on it at every step
    (2, 2, 1.0, 1),    # another daemon generating with one thread
    (2, 2, 2.0, 1),    # every CPU busy: still one thread, never none
    (3, 4, 1.0, 3),    # a Pi with one CPU kept free by the profile: the reserve already covers it
    (3, 4, 1.6, 2),
    (8, 16, 2.0, 8),   # many idle CPUs: the cap stands
    (4, 0, 3.0, 4),    # usable unknown (a fixed thread count from the config): the plan stands
])
def test_threads_under_load(planned: int, usable: int, others: float, expected: int) -> None:
    assert threads_under_load(planned, usable, others) == expected


def test_others_busy_subtracts_this_process() -> None:
    before = CpuSample(wall=10.0, busy=100.0, own=50.0)
    after = CpuSample(wall=11.0, busy=102.0, own=51.0)  # 2 CPUs busy for the second, 1 of them this process
    assert others_busy(before, after) == pytest.approx(1.0)
    assert others_busy(after, after) == 0.0


def scripted(others: Iterator[float], own: float = 1.0) -> tuple[ThreadGovernor, list[float]]:
    """A governor over a sampler whose clock steps by RECHECK_S and whose other processes keep ``others`` busy."""
    state = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    sleeps: list[float] = []

    def sample() -> CpuSample:
        state["wall"] += RECHECK_S
        busy_now = next(others)
        state["busy"] += (busy_now + own) * RECHECK_S
        state["own"] += own * RECHECK_S
        return CpuSample(state["wall"], state["busy"], state["own"])

    # The governor's clock reads the time the next sample will carry.
    return ThreadGovernor(2, 2, 2, sample, sleep=sleeps.append, clock=lambda: state["wall"] + RECHECK_S), sleeps


def test_governor_gives_way_and_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    governor, sleeps = scripted(iter([0.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    caplog.set_level(logging.INFO, logger="edge_assistant.cpuload")
    assert governor.now(starting=True) == (2, 2)  # first look: a fresh window is measured
    assert sleeps, "the first look measures a window of its own"
    assert governor.now() == (2, 2)
    assert governor.now() == (1, 1)  # another process started generating
    assert governor.now() == (1, 1)
    assert governor.now() == (2, 2)  # it stopped
    assert [r.getMessage() for r in caplog.records] == [
        "generation threads 2/2 -> 1/1: other processes keep 1.0 of 2 CPUs busy",
        "generation threads 1/1 -> 2/2: other processes keep 0.0 of 2 CPUs busy",
    ]


def test_governor_looks_from_one_thread_at_a_time() -> None:
    """The engine and the embedder share one governor, called from the request worker and from a reload thread:
    a look (reading the clocks, comparing with the last reading) runs for one caller at a time."""
    wall = [0.0]
    inside = [0]
    overlapped: list[str] = []
    guard = threading.Lock()
    first_in = threading.Event()
    second_in = threading.Event()

    def sample() -> CpuSample:
        with guard:
            inside[0] += 1
            if inside[0] > 1:
                overlapped.append(threading.current_thread().name)
            wall[0] += RECHECK_S
            now = wall[0]
        if threading.current_thread().name == "reload":
            second_in.set()
        elif not first_in.is_set():
            first_in.set()
            second_in.wait(1.0)  # the reload thread's chance to read the clocks in the middle of this look
        with guard:
            inside[0] -= 1
        return CpuSample(now, now, now)

    governor = ThreadGovernor(2, 2, 2, sample, sleep=lambda _s: None, clock=lambda: wall[0] + 10 * RECHECK_S)
    results: dict[str, tuple[int, int]] = {}
    worker = threading.Thread(target=lambda: results.update(worker=governor.now(starting=True)), name="worker")
    worker.start()
    assert first_in.wait(30)
    reload = threading.Thread(target=lambda: results.update(reload=governor.now(starting=True)), name="reload")
    reload.start()
    worker.join(30)
    reload.join(30)
    assert overlapped == []
    assert results == {"worker": (2, 2), "reload": (2, 2)}


def test_context_threads_calls_llama_only_on_change() -> None:
    governor, _ = scripted(iter([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    applied: list[tuple[int, int]] = []
    threads = ContextThreads(governor, lambda n, nb: applied.append((n, nb)))
    for _ in range(6):
        threads.update()
    assert applied == [(1, 1), (2, 2)]
    ContextThreads(None, lambda n, nb: applied.append((n, nb))).update()  # no governor: nothing is touched
    assert applied == [(1, 1), (2, 2)]


def test_psutil_sampler_reads_this_machine() -> None:
    sample = psutil_sampler([0])
    first = sample()
    sum(i * i for i in range(200_000))  # some work of this process
    second = sample()
    assert second.wall > first.wall and second.own > first.own and second.busy >= first.busy


def test_a_tick_moving_from_idle_to_iowait_is_not_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may move time between idle and iowait; busy time read from the busy fields does not move."""
    import collections

    import psutil

    Times = collections.namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    readings = iter([[Times(821.1, 0.3, 0.07, 5000.0, 12.33, 0.1, 0.2, 0.0, 0.0, 0.0)],
                     [Times(821.1, 0.3, 0.07, 4999.99, 12.34, 0.1, 0.2, 0.0, 0.0, 0.0)]])
    monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: next(readings))
    sample = psutil_sampler([0])
    assert sample().busy == sample().busy


def test_changing_threads_between_tokens_keeps_the_answer(engine: Engine) -> None:
    """The real model answers byte for byte the same whether its thread count stays or changes at every token."""
    messages = [{"role": "system", "content": "You are a maintenance assistant."},
                {"role": "user", "content": "Explain spindle warm-up in three steps."}]
    sampling = Sampling(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=7, max_tokens=48)
    steady = engine.generate(messages, sampling)
    governor, _ = scripted(iter([float(i % 2) for i in range(10_000)]))  # busy, quiet, busy, ...
    applied: list[tuple[int, int]] = []
    original = engine._threads

    def apply(n: int, nb: int) -> None:
        applied.append((n, nb))
        engine._llm._ctx.set_n_threads(n, nb)

    engine._threads = ContextThreads(governor, apply)
    try:
        changing = engine.generate(messages, sampling)
    finally:
        engine._threads = original
        engine._llm._ctx.set_n_threads(engine.settings.n_threads, engine.settings.n_threads_batch)
    assert len(set(applied)) == 2 and len(applied) > 10, applied
    assert changing.text == steady.text and changing.completion_tokens == steady.completion_tokens == 48


def test_the_load_is_read_only_when_a_look_is_due() -> None:
    """Asked at every token, the governor reads /proc/stat once per RECHECK_S, not once per token."""
    now = [0.0]
    reads = []

    def sample() -> CpuSample:
        reads.append(now[0])
        return CpuSample(now[0], 0.0, 0.0)

    governor = ThreadGovernor(2, 2, 2, sample, sleep=lambda s: None, clock=lambda: now[0])
    governor.now(starting=True)
    for _ in range(100):  # a hundred tokens within 0.1 s
        now[0] += 0.001
        governor.now()
    assert len(reads) == 2  # the first look's two readings (a fresh window), none per token
    now[0] += RECHECK_S
    governor.now()
    assert len(reads) == 3

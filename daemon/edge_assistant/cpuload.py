"""Generation threads that give way to other busy processes.

llama.cpp's threads wait for each other at every step, so one thread that shares its CPU with another busy process
holds all of them back. On a 2-core machine two daemons with 2 threads each took 34 s for a 6-token answer that
takes well under a second with 1 thread each. The profile plans the thread count for a quiet machine; the
``ThreadGovernor`` lowers it, between steps, while other processes keep this process's CPUs busy, and raises it
again when they stop. The thread count does not change answers on the CPU backend (checked token by token in the
tests), so this costs no determinism.

The governor is called by whichever thread computes with llama.cpp: the request worker, or with parallel slots the
decode thread (which then also runs the embeddings: ``slots.SlotDecoder.call``); embeddings also on a start-up or
reload thread. It holds a lock of its own, so those threads never step on each other's readings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .profiles import threads_under_load

log = logging.getLogger(__name__)

RECHECK_S = 0.25
"""How often the load is looked at during a generation."""
FRESH_WINDOW_S = 0.05
"""A look after a quiet spell measures this long, so an old average does not hide what runs now."""
STALE_S = 1.0
"""A measurement older than this is not trusted for the next request."""


@dataclass(frozen=True)
class CpuSample:
    """One reading of the clocks the load is computed from."""

    wall: float
    """``time.monotonic()`` at the reading, in seconds."""
    busy: float
    """CPU seconds spent busy (not idle, not waiting for I/O) so far on this process's CPUs, by anyone."""
    own: float
    """CPU seconds spent so far by this process (user and system)."""


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """CPUs kept busy by other processes (the hypervisor's steal included) between two samples."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")
"""The fields of ``psutil.cpu_times`` in which a CPU worked (Linux names; absent ones count 0)."""


def psutil_sampler(cpus: Sequence[int]) -> Callable[[], CpuSample]:
    """A reading of ``cpus`` and of this process, through psutil."""
    import psutil

    me = psutil.Process()
    wanted = set(cpus)

    def sample() -> CpuSample:
        per_cpu = psutil.cpu_times(percpu=True)
        busy = 0.0
        for index, t in enumerate(per_cpu):
            if not wanted or index in wanted:
                # The busy fields added up, not the total less idle and iowait: a tick moving between idle and
                # iowait would otherwise show as float noise, sometimes below the previous reading. Guest time is
                # already counted in user time.
                busy += sum(getattr(t, name, 0.0) for name in BUSY_FIELDS)
        own = me.cpu_times()
        return CpuSample(time.monotonic(), busy, own.user + own.system)

    return sample


class ThreadGovernor:
    """The thread counts to run with now: the planned ones, less the CPUs other processes keep busy.

    One governor serves a model's engine and its embedder. ``now`` is called by the thread about to compute: the
    scheduler's request worker (generation, and the answer check's embeddings), the slots' decode thread (with
    parallel slots: generation and every embedding), a start-up thread (the guard's examples embedded at load),
    the reload thread (a reload's new examples), and ``Engine.run``'s short-lived thread for the main thread. A
    lock makes each look (read the clocks, compare with the last reading, decide) one step, whichever thread calls.
    """

    def __init__(self, n_threads: int, n_threads_batch: int, usable_cpus: int,
                 sampler: Callable[[], CpuSample] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.planned = (n_threads, n_threads_batch)
        self.usable_cpus = usable_cpus
        self._sample = sampler
        self._sleep = sleep
        self._clock = clock  # the sampler's clock: checked before reading /proc/stat on every token
        self._last: CpuSample | None = None
        self._now = self.planned
        self._lock = threading.Lock()
        self.others = 0.0
        """CPUs other processes kept busy at the last look."""

    def now(self, starting: bool = False) -> tuple[int, int]:
        """(generation threads, prompt threads) for the next step; ``starting`` marks the start of a request."""
        sample = self._sample
        if sample is None:
            return self.planned
        with self._lock:
            return self._look(sample, starting)

    def _look(self, sample: Callable[[], CpuSample], starting: bool) -> tuple[int, int]:
        """One look at the load, with the lock held."""
        last = self._last
        if last is not None and self._clock() - last.wall < RECHECK_S:  # too short a window: the last answer stands
            return self._now
        current = sample()
        if last is None or (starting and current.wall - last.wall > STALE_S):
            self._sleep(FRESH_WINDOW_S)
            last, current = current, sample()
        self._last = current
        self.others = others_busy(last, current)
        n = threads_under_load(self.planned[0], self.usable_cpus, self.others)
        nb = threads_under_load(self.planned[1], self.usable_cpus, self.others)
        if (n, nb) != self._now:
            log.info("generation threads %d/%d -> %d/%d: other processes keep %.1f of %d CPUs busy",
                     *self._now, n, nb, self.others, self.usable_cpus)
            self._now = (n, nb)
        return self._now


class ContextThreads:
    """Applies a governor's counts to one llama.cpp context, calling into it only when they change."""

    def __init__(self, governor: ThreadGovernor | None, apply: Callable[[int, int], None]) -> None:
        self.governor = governor
        self._apply = apply
        self._applied = governor.planned if governor is not None else (0, 0)

    def update(self, starting: bool = False) -> None:
        """Look at the load (at most every ``RECHECK_S`` unless ``starting``) and set the context's threads."""
        if self.governor is None:
            return
        wanted = self.governor.now(starting)
        if wanted != self._applied:
            self._apply(*wanted)
            self._applied = wanted

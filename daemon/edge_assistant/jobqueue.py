"""A bounded priority queue of requests that refuses (never drops silently) and answers each key once."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PRIORITY_ALARM = 0
"""PLC alarms go before everything else."""
PRIORITY_CHAT = 1
"""Ordinary requests."""


@dataclass(order=True)
class _Entry(Generic[T]):
    priority: int
    seq: int
    item: T = field(compare=False)
    key: str = field(compare=False, default="")


class JobQueue(Generic[T]):
    """Bounded, prioritised, de-duplicating. ``put`` says why it refused; ``get`` blocks."""

    def __init__(self, maxsize: int, remember: int = 1024) -> None:
        self.maxsize = maxsize
        self._heap: list[_Entry[T]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._active: set[str] = set()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def put(self, item: T, priority: int = PRIORITY_CHAT, key: str = "") -> str:
        """Queue ``item``; returns ``""`` when queued, else ``"duplicate"``, ``"full"`` or ``"closed"``."""
        with self._cond:
            if self._closed:
                return "closed"
            if key and (key in self._active or key in self._done):
                log.info("duplicate request %s ignored: it is queued, running or answered", key)
                return "duplicate"
            if len(self._heap) >= self.maxsize:
                log.warning("queue full (%d): request %s refused", self.maxsize, key or "-")
                return "full"
            heapq.heappush(self._heap, _Entry(priority, next(self._seq), item, key))
            if key:
                self._active.add(key)
            self._cond.notify()
            return ""

    def get(self, timeout: float | None = None) -> tuple[T, str] | None:
        """The next item and its key, highest priority first; ``None`` on timeout or once closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._heap or self._closed, timeout):
                return None
            if not self._heap:
                return None
            entry = heapq.heappop(self._heap)
            return entry.item, entry.key

    def done(self, key: str) -> None:
        """Mark ``key`` answered: a redelivery of it is ignored from now on."""
        if not key:
            return
        with self._cond:
            self._active.discard(key)
            self._done[key] = None
            while len(self._done) > self._remember:
                self._done.popitem(last=False)

    def forget(self, key: str) -> None:
        """Let ``key`` be queued again (it was not answered, e.g. the daemon is stopping)."""
        with self._cond:
            self._active.discard(key)

    def close(self) -> list[tuple[T, str]]:
        """Refuse new items and hand back everything still waiting (to be answered ``shutting_down``)."""
        with self._cond:
            self._closed = True
            left = [(e.item, e.key) for e in sorted(self._heap)]
            self._heap.clear()
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

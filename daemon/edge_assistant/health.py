"""Health figures of this process and machine, read with psutil."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil


class HealthSampler:
    """Samples CPU, memory, temperature and load; the first CPU reading primes psutil's counters."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._start = time.monotonic()
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        """A JSON-ready dict of the machine's and the daemon's state now."""
        mem = psutil.virtual_memory()
        info = self._proc.memory_info()
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "uptime_s": round(time.monotonic() - self._start, 1),
            "cpu_percent": psutil.cpu_percent(None),
            "process_cpu_percent": self._proc.cpu_percent(None),
            "mem_percent": mem.percent,
            "mem_available_mb": round(mem.available / 2**20, 1),
            "rss_mb": round(info.rss / 2**20, 1),
            "load1": round(os.getloadavg()[0], 2),
            "temperature_c": _temperature(),
        }
        return out


def has_temperature() -> bool:
    """Whether this machine reports a temperature (no Home Assistant entity is made for one it never will)."""
    return _temperature() is not None


def _temperature() -> float | None:
    try:
        temps = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    readings = [t.current for entries in temps.values() for t in entries if t.current]
    return round(max(readings), 1) if readings else None

"""The replies the scheduler remembers by request key, so a copy of a request is never generated twice.

``MemoryReplies`` forgets on restart. ``SqliteReplies`` keeps them in the state directory: a request the broker
delivers again after the daemon was killed (its acknowledgement lost with the process) gets the reply it already
had, instead of a second generation. Both keep the newest ``limit`` replies.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from .messages import ErrorInfo, Reply, SourceRef, Usage

log = logging.getLogger(__name__)


class ReplyStore(Protocol):
    """Replies by request key, bounded."""

    def get(self, key: str) -> Reply | None: ...

    def put(self, key: str, reply: Reply) -> None: ...

    def answered_here(self, key: str) -> bool:
        """Whether this process gave the reply (else it comes from before a restart, and may never have left)."""
        ...


class MemoryReplies:
    """The newest ``limit`` replies, in memory."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._items: OrderedDict[str, Reply] = OrderedDict()

    def get(self, key: str) -> Reply | None:
        reply = self._items.get(key)
        if reply is not None:
            self._items.move_to_end(key)
        return reply

    def answered_here(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, reply: Reply) -> None:
        self._items[key] = reply
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)


class SqliteReplies:
    """The newest ``limit`` replies in a SQLite file; a failed write is logged and the reply kept in memory."""

    def __init__(self, path: Path, limit: int = 256) -> None:
        self.path = path
        self.limit = limit
        self._memory = MemoryReplies(limit)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS replies (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                           "key TEXT NOT NULL UNIQUE, reply TEXT NOT NULL)")

    def get(self, key: str) -> Reply | None:
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                return found
            try:
                row = self._conn.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as exc:
                log.warning("cannot read the stored replies %s: %s", self.path, exc)
                return None
        return reply_from_dict(json.loads(row[0])) if row else None

    def answered_here(self, key: str) -> bool:
        with self._lock:
            return self._memory.answered_here(key)

    def put(self, key: str, reply: Reply) -> None:
        with self._lock:
            self._memory.put(key, reply)
            try:
                self._conn.execute("INSERT OR REPLACE INTO replies (key, reply) VALUES (?, ?)",
                                   (key, json.dumps(reply.to_dict(), ensure_ascii=False)))
                self._conn.execute("DELETE FROM replies WHERE seq <= (SELECT max(seq) FROM replies) - ?",
                                   (self.limit,))
            except sqlite3.Error as exc:  # a full or read-only disk: remembered in memory only
                log.warning("cannot store the reply to %s in %s: %s", key, self.path, exc)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def reply_from_dict(data: dict[str, Any]) -> Reply:
    """A reply from its ``Reply.to_dict`` form, with every field that form holds: a stored reply is sent again
    exactly as it was sent the first time (a field added to ``Reply`` comes back too)."""
    values = {f.name: data[f.name] for f in fields(Reply) if f.name in data}
    error, usage = values.get("error"), values.get("usage")
    values.update(
        id=str(values.get("id", "")),
        status=values.get("status", "error"),
        text=str(values.get("text", "")),
        persona=str(values.get("persona", "")),
        error=ErrorInfo(**error) if isinstance(error, dict) else None,
        usage=Usage(**usage) if isinstance(usage, dict) else None,
        sources=tuple(SourceRef(**s) for s in values.get("sources") or () if isinstance(s, dict)),
        provenance=dict(values.get("provenance") or {}),
    )
    return Reply(**values)

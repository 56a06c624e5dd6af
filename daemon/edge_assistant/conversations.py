"""Bounded conversation memory: the last answered turns of each conversation a client names, kept across restarts.

One job: remember. What a follow-up is retrieved with is ``followup``'s; what the model sees is ``personas``'.

- A conversation keeps its last ``max_turns`` answered turns (question, answer, the sources cited, and the
  identifiers and subject terms the turn was about), and counts every request asked in it (the reply's ``turn``).
  A refused or failed request is counted but not kept: an off-topic turn leaves nothing a later turn builds on.
- A conversation not continued for ``idle_s`` is forgotten; with ``max_conversations`` kept, one more forgets the
  least recently continued. Every entry is bounded (``MAX_TEXT`` characters a text, ``MAX_ITEMS`` identifiers,
  terms or sources), so memory is bounded by the config, whatever clients send.
- With a directory, each conversation is one JSON file named by the SHA-256 of its name (a client's name is no
  file name), replaced atomically on every turn: written to a temporary file in the same directory, flushed to disk,
  then renamed over the old one (``os.replace``). A process killed at any moment leaves the old file or the new one,
  never half of one. A file that cannot be read is logged, set aside (``.corrupt``), and its conversation starts
  empty. A directory that cannot be written keeps conversations in memory, with a warning.

Threads: the scheduler's inference threads are the only writers (``pipeline.handle`` calls ``begin`` and
``finish``); the lock makes them safe with ``parallel`` slots. ``read_conversation`` reads one file without the
store (the ``knowledge search --conversation`` command, in another process).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ConversationsConfig

log = logging.getLogger(__name__)

FORMAT = 1
"""The layout of a conversation file; another is read as unreadable."""
MAX_TEXT = 4000
"""Characters kept of a question or an answer."""
MAX_ITEMS = 16
"""Identifiers, terms or sources kept per turn."""


@dataclass(frozen=True)
class Turn:
    """One answered turn."""

    question: str
    """What was asked."""
    answer: str
    """What was answered."""
    sources: tuple[tuple[str, str], ...] = ()
    """The cited passages: (document, location)."""
    identifiers: tuple[str, ...] = ()
    """The identifiers (alarm codes, part numbers) the turn was about, normalised."""
    terms: tuple[str, ...] = ()
    """The subject terms it was about: words the documents know."""
    about: str = ""
    """The earlier question that named the subject this turn continued ("What does alarm 2014 mean?" for "How do I
    clear it?"); empty when the turn named its own."""

    @property
    def subject_question(self) -> str:
        """The question that named this turn's subject: ``about``, or its own."""
        return self.about or self.question

    def bounded(self) -> Turn:
        """The turn with every part cut to its bound."""
        return Turn(self.question[:MAX_TEXT], self.answer[:MAX_TEXT],
                    tuple((d[:300], loc[:300]) for d, loc in self.sources[:MAX_ITEMS]),
                    tuple(i[:64] for i in self.identifiers[:MAX_ITEMS]), tuple(t[:64] for t in self.terms[:MAX_ITEMS]),
                    self.about[:MAX_TEXT])


@dataclass(frozen=True)
class Conversation:
    """What is remembered of one conversation."""

    name: str
    """The client's name for it."""
    turns: tuple[Turn, ...] = ()
    """The last answered turns, oldest first."""
    asked: int = 0
    """Requests asked in it so far (answered or not)."""
    used: float = 0.0
    """When it was last continued (``time.time()``: a wall clock, so expiry holds across restarts)."""


@dataclass(frozen=True)
class Context:
    """What a request in a conversation starts from (``Conversations.begin``)."""

    turn: int
    """This request's number in the conversation."""
    history: tuple[Turn, ...] = ()
    """The answered turns before it, oldest first."""

    @property
    def previous(self) -> Turn | None:
        """The last answered turn, if any."""
        return self.history[-1] if self.history else None

    @property
    def digest(self) -> str:
        """SHA-256 of the conversation so far (every kept turn's question, answer and sources): the same turns,
        the same digest, so a panel can tell an answer that depended on earlier turns."""
        return digest_of(self.history)


def digest_of(turns: Sequence[Turn]) -> str:
    """SHA-256 of turns' questions, answers and sources, as canonical JSON."""
    plain = [[t.question, t.answer, [list(s) for s in t.sources]] for t in turns]
    return hashlib.sha256(json.dumps(plain, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def file_name(name: str) -> str:
    """The file of conversation ``name``: a digest, since a client's name may hold any character."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:40] + ".json"


class Conversations:
    """The conversations, bounded by a ``ConversationsConfig``; with ``directory``, kept there across restarts."""

    def __init__(self, cfg: ConversationsConfig | None = None, directory: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg or ConversationsConfig()
        self.directory = directory
        self.clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        """Least recently continued first."""
        if directory is not None:
            self._load(directory)

    # -- reading and writing, from the inference threads -------------------------------------------------------

    def configure(self, cfg: ConversationsConfig) -> None:
        """New bounds (a reload); conversations beyond them are forgotten now."""
        with self._lock:
            self.cfg = cfg
            self._trim()
            for name in list(self._items):
                if len(self._items[name].turns) > cfg.max_turns:
                    self._items[name] = replace(self._items[name], turns=self._items[name].turns[-cfg.max_turns:])
                    self._save(self._items[name])

    def begin(self, name: str) -> Context:
        """Start a request in conversation ``name``: its number and the turns before it. A conversation idle past
        ``idle_s`` starts afresh."""
        with self._lock:
            self._expire()
            conv = self._items.pop(name, None) or Conversation(name)
            conv = replace(conv, asked=conv.asked + 1, used=self.clock())
            self._items[name] = conv
            self._trim()
            return Context(conv.asked, conv.turns)

    def finish(self, name: str, turn: Turn | None) -> None:
        """The request is answered (``turn``) or not (None): keep it and write the conversation down."""
        with self._lock:
            conv = self._items.pop(name, None) or Conversation(name, asked=1)
            turns = conv.turns if turn is None else (*conv.turns, turn.bounded())[-self.cfg.max_turns:]
            conv = replace(conv, turns=turns, used=self.clock())
            self._items[name] = conv
            self._trim()
            self._save(conv)

    def forget(self, name: str) -> bool:
        """End conversation ``name``; whether there was one."""
        with self._lock:
            conv = self._items.pop(name, None)
            self._remove(name)
            return conv is not None

    def get(self, name: str) -> Conversation | None:
        """Conversation ``name`` as it is now (None when there is none, or it expired)."""
        with self._lock:
            self._expire()
            return self._items.get(name)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    # -- the bounds ----------------------------------------------------------------------------------------------

    def _expire(self) -> None:
        """Forget conversations idle past ``idle_s`` (the least recently continued come first)."""
        cutoff = self.clock() - self.cfg.idle_s
        while self._items:
            name, conv = next(iter(self._items.items()))
            if conv.used > cutoff:
                break
            del self._items[name]
            self._remove(name)

    def _trim(self) -> None:
        while len(self._items) > self.cfg.max_conversations:
            name, _ = self._items.popitem(last=False)
            self._remove(name)

    # -- the files -----------------------------------------------------------------------------------------------

    def _save(self, conv: Conversation) -> None:
        if self.directory is None:
            return
        path = self.directory / file_name(conv.name)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(to_dict(conv), fh, ensure_ascii=False, separators=(",", ":"))
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(path)  # os.replace: atomic within the directory
        except OSError as exc:  # a full or read-only disk: this conversation lives on in memory
            log.warning("conversations: cannot write %s (%s): kept in memory only", path, exc)
            tmp.unlink(missing_ok=True)

    def _remove(self, name: str) -> None:
        if self.directory is None:
            return
        try:
            (self.directory / file_name(name)).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("conversations: cannot remove the file of a forgotten conversation: %s", exc)

    def _load(self, directory: Path) -> None:
        """Read every conversation file; unreadable ones are set aside, expired ones removed."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            paths = sorted(directory.glob("*.json"))
        except OSError as exc:
            log.warning("conversations: cannot use %s (%s): conversations are kept in memory only", directory, exc)
            self.directory = None
            return
        for stale in directory.glob(".*.tmp"):  # a write cut short by a kill: the old file is still whole
            stale.unlink(missing_ok=True)
        found: list[Conversation] = []
        for path in paths:
            conv = _read(path)
            if conv is None:
                continue
            if path.name != file_name(conv.name):
                log.warning("conversations: %s holds conversation %r, whose file has another name: skipped",
                            path, conv.name[:64])
                continue
            found.append(conv)
        cutoff = self.clock() - self.cfg.idle_s
        for conv in sorted(found, key=lambda c: (c.used, c.name)):
            if conv.used <= cutoff:
                self._remove(conv.name)
                continue
            self._items[conv.name] = replace(conv, turns=conv.turns[-self.cfg.max_turns:])
        self._trim()
        if self._items:
            log.info("conversations: %d continued from %s", len(self._items), directory)


def read_conversation(directory: Path, name: str) -> Conversation | None:
    """Conversation ``name`` as its file holds it (None without one), read without a store: for a command run
    beside the daemon. Expiry is the caller's to judge (``Conversation.used``)."""
    path = directory / file_name(name)
    return _read(path) if path.is_file() else None


def _read(path: Path) -> Conversation | None:
    """A conversation file, or None (logged, and the file set aside as ``.corrupt``) when it cannot be read."""
    try:
        conv = from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
        aside = path.with_suffix(".corrupt")
        log.warning("conversations: %s cannot be read (%s: %s): that conversation starts empty; the file is kept "
                    "as %s", path, type(exc).__name__, exc, aside.name)
        with contextlib.suppress(OSError):
            path.replace(aside)
        return None
    return conv


def to_dict(conv: Conversation) -> dict[str, Any]:
    """A conversation as the JSON its file holds."""
    return {"format": FORMAT, "name": conv.name, "asked": conv.asked, "used": conv.used,
            "turns": [{"question": t.question, "answer": t.answer, "sources": [list(s) for s in t.sources],
                       "identifiers": list(t.identifiers), "terms": list(t.terms), "about": t.about}
                      for t in conv.turns]}


def from_dict(data: Any) -> Conversation:
    """A conversation from its file's JSON; ``ValueError`` (or ``TypeError``/``KeyError``) for anything else."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a conversation file of format {FORMAT}")
    name, asked, used = data["name"], data["asked"], data["used"]
    if not isinstance(name, str) or not name or isinstance(asked, bool) or not isinstance(asked, int):
        raise ValueError("bad name or count")
    if isinstance(used, bool) or not isinstance(used, int | float):
        raise ValueError("bad time")
    turns = []
    for t in data["turns"]:
        texts = (t["question"], t["answer"], t.get("about", ""))
        sources = tuple((str(d), str(loc)) for d, loc in t["sources"])
        idents, terms = tuple(t["identifiers"]), tuple(t["terms"])
        if not all(isinstance(x, str) for x in (*texts, *idents, *terms)):
            raise ValueError("a turn holds something other than text")
        turns.append(Turn(texts[0], texts[1], sources, idents, terms, texts[2]).bounded())
    return Conversation(name, tuple(turns), asked, float(used))


"""Log records a request cannot forge: every value is escaped on its way into a log line.

Request values (ids, topics, personas, questions, correlation data) reach the log as arguments of log calls, as
journald fields (``extra``) and inside exception messages. ``EscapeFilter``, on each of the daemon's log handlers,
rewrites every record before a handler formats it: each character Python's ``repr`` would escape (line feed,
carriage return, NUL, ESC and the other control characters, Unicode line separators, invisible format characters)
is written as its escape (``\\n``, ``\\x00``, ``\\u2028``). So one record is one line (a traceback's own frame lines
aside), and no journald field holds a raw control character. Doing it here, once, covers every log call, present
and future, of this package and of the libraries it uses.
"""

from __future__ import annotations

import logging
import traceback

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
"""The attributes every record has; any other was added with ``extra`` (journald fields such as ``REQUEST_ID``)."""


def escape(text: str) -> str:
    """``text`` with every character ``repr`` would escape written as its escape; printable text is unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    code = ord(c)
    if c in _NAMED:
        return _NAMED[c]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def exception_text(exc: BaseException) -> str:
    """The traceback ``logging`` would write for ``exc`` (its causes and contexts first), with each exception's
    own text escaped: the frame lines come from the code, the messages may carry request values."""
    chain: list[tuple[str, BaseException]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if current.__cause__ is not None:
            link, following = _CAUSE, current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            link, following = _CONTEXT, current.__context__
        else:
            link, following = "", None
        chain.append((link, current))
        current = following
    out: list[str] = []
    for link, item in reversed(chain):  # the first cause first; each link says how the next one came about
        out.append(link)
        tb = traceback.TracebackException(type(item), item, item.__traceback__, compact=True)
        if tb.stack:
            out.append("Traceback (most recent call last):\n")
            out.extend(tb.stack.format())
        out.extend(escape(line.removesuffix("\n")) + "\n" for line in tb.format_exception_only())
    return "".join(out).removesuffix("\n")


class EscapeFilter(logging.Filter):
    """Escapes a record's message, its ``extra`` string fields and its exception's text (see the module)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = escape(record.getMessage()), None
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, escape(value))
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = exception_text(record.exc_info[1])
        return True


def install(handler: logging.Handler) -> logging.Handler:
    """``handler`` with the escaping filter on it (once)."""
    if not any(isinstance(f, EscapeFilter) for f in handler.filters):
        handler.addFilter(EscapeFilter())
    return handler

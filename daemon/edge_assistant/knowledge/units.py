"""A passage cut into the units that can answer a question: its title, its sentences, its steps, or a table row.

The indexer embeds each unit and the answer choice quotes one; both cut a passage here, the same way, so the n-th
stored vector belongs to the n-th unit of the passage.

- A **title** (a section's heading path, a page's first short line) stands for its whole section: a question that
  matches a procedure's title asks for the procedure, which is then quoted from its first step to its last.
- A **step** is an item of a numbered or bulleted list; a **sentence** is running text, wrapped lines joined.
- A **row** of a table is one unit: its fields answer together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..messages import Passage
from ..text import LIST_ITEM, sentences
from .identifiers import normalize_id

UnitKind = Literal["title", "sentence", "step", "row"]


@dataclass(frozen=True)
class Unit:
    """One piece of a passage that can answer a question alone."""

    text: str
    """As the document writes it (its wrapped lines joined); for a row, the row in its own words."""
    heading: str
    """The heading path or page title it stands under (``""`` when none; for a title, the title itself)."""
    position: int
    """Its place among the passage's units."""
    kind: UnitKind
    """``title``, ``sentence``, ``step`` or ``row``."""

    @property
    def embedded(self) -> str:
        """What is embedded for it: a sentence or step with the heading it stands under, which says what it is
        about ("Torque to 40 Nm." under "Chuck jaws")."""
        if self.kind in ("sentence", "step", "row") and self.heading:
            return f"{self.heading}: {self.text}"
        return self.text


def is_title(line: str) -> bool:
    """A short line that does not end a sentence: a page title, a table caption."""
    return not line.endswith((".", "!", "?", ":", ";", ",")) and len(line.split()) <= 8


def units_of(passage: Passage) -> list[Unit]:
    """``passage`` cut into units, in document order."""
    if passage.kind == "row":
        text = row_text(passage)
        return [Unit(text, "", 0, "row")] if text else []
    lines = [line.strip() for line in passage.text.splitlines()]
    heading = ""
    out: list[Unit] = []
    if lines and (passage.kind == "section" or (is_title(lines[0]) and len(lines) > 1)):
        heading, lines = lines[0], lines[1:]
        out.append(Unit(heading, heading, 0, "title"))
    logical: list[str] = []  # lines joined where the document only wrapped them
    for line in lines:
        if not line:
            logical.append("")
            continue
        prev = logical[-1] if logical else ""
        # A line wraps on when the one before ends mid-sentence, unless that one is a title and this one starts a
        # new sentence; a list item or a table line never continues the line before it.
        table_line = _cells(line) is not None or _cells(prev) is not None
        if (prev and not table_line and not LIST_ITEM.match(line) and not prev.endswith((".", "!", "?", ":"))
                and (line[0].islower() or not is_title(prev))):
            logical[-1] += " " + line
        else:
            logical.append(line)
    table: list[list[str]] = []  # the header, then the rows of a Markdown pipe table being read
    for line in (x for x in logical if x):
        cells = _cells(line)
        if cells is not None:
            if table and all(set(c) <= set("-: ") for c in cells):
                continue  # the line under the header
            if not table:
                table.append(cells)
                continue
            table.append(cells)
            out.append(Unit(_row(table[0], cells), heading, len(out), "row"))
            continue
        table = []
        if is_title(line) and not LIST_ITEM.match(line):
            heading = line.rstrip(":")
            out.append(Unit(heading, heading, len(out), "title"))
            continue
        step = bool(LIST_ITEM.match(line))
        for piece in ([line] if step else sentences(line)):
            out.append(Unit(piece, heading, len(out), "step" if step else "sentence"))
    return out


def section_of(units: list[Unit], title: Unit) -> list[Unit]:
    """The units a title stands for: a passage's first title (its heading path) the whole passage; a title inside
    it those after it up to the next title."""
    out: list[Unit] = []
    for u in units[title.position + 1:]:
        if u.kind == "title" and title.position > 0:
            break
        if u.kind != "title":
            out.append(u)
    return out


def _cells(line: str) -> list[str] | None:
    """The cells of a Markdown pipe-table line, or None when it is not one."""
    if not (line.startswith("|") and line.endswith("|") and line.count("|") >= 3):
        return None
    return [c.strip() for c in line[1:-1].split("|")]


def _row(header: list[str], cells: list[str]) -> str:
    """A table row as its header's field names with its values (``Bottle: 0.5 l PET. Line speed: 12000/h.``)."""
    pairs = [(h or f"column {i}", c) for i, (h, c) in enumerate(zip(header, cells, strict=False), 1) if c]
    return " ".join(f"{h}: {_sentence(c)}" for h, c in pairs)


def row_text(passage: Passage) -> str:
    """A table row in its own words, in its column order: ``code: A412 / message: Spindle overtemperature /
    cause: ...`` becomes ``A412 — Spindle overtemperature. Cause: ... Action: ...``."""
    fields = [line.split(": ", 1) for line in passage.text.splitlines() if ": " in line]
    if not fields:
        return ""
    ident = next((v for _k, v in fields if passage.row_id and normalize_id(v) == passage.row_id), "")
    rest = [(k, v) for k, v in fields if v != ident]
    if not rest:
        return ident
    head, *tail = rest
    parts = [f"{ident} — {_sentence(head[1])}" if ident else f"{head[0].capitalize()}: {_sentence(head[1])}"]
    parts += [f"{k.replace('_', ' ').capitalize()}: {_sentence(v)}" for k, v in tail]
    return " ".join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."

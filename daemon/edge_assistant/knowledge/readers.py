"""Documents read into passages along their structure: a section under its headings, a text block, a PDF page, a
table row.

Markdown, Word (``.docx``) and HTML share one outline: headings make a section's heading path, list items keep
their ``1.`` or ``-`` marker, tables become rows of ``header: value`` pairs (as CSV and Excel rows do). Nothing is
cut off: a text longer than ``max_chars`` is split at paragraph ends, then line ends, sentence ends and spaces.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import io
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

from ..config import KnowledgeConfig
from ..text import sentences
from .identifiers import normalize_id

log = logging.getLogger(__name__)

KINDS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".pdf": "pdf", ".csv": "csv", ".docx": "docx",
         ".xlsx": "xlsx", ".html": "html", ".htm": "html"}
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document."""

    location: str
    """Where it is: ``section Coolant > Mixing``, ``page 3``, ``row 14 (code A412)``, ``lines 1-12``,
    ``sheet Alarms row 5 (Code E12)``, ``table 2 row 3 in section Lubrication``."""
    text: str
    """Its text (a table row as ``header: value`` pairs; a section with its heading path)."""
    row_id: str = ""
    """A table row's identifier (its identifier column's value), normalised."""
    kind: str = "text"
    """What it is: ``section`` (under a heading), ``text`` (a block of plain text), ``page`` or ``row``."""


@dataclass(frozen=True)
class Parsed:
    """What a reader made of one file."""

    chunks: tuple[Chunk, ...]
    """Its chunks, in document order."""
    pages: int
    """Pages (PDF) or page equivalents (3,000 characters) for the indexing figures."""


class UnreadableError(Exception):
    """A document that cannot be read; the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# Splitting: coarsest boundary first, nothing dropped

_LIST_LINE = r"\s*(?:\d+[.)]|[-*\u2022])\s"
_LEVELS: tuple[tuple[Callable[[str], list[str]], str], ...] = (
    (lambda t: re.split(r"\n[ \t]*\n\s*", t), "\n\n"),  # paragraphs
    # line ends that end something: before a list item, after a line that ends in punctuation (not a hard wrap)
    (lambda t: re.split(rf"\n(?={_LIST_LINE})|(?<=[.!?:;])[ \t]*\n", t), "\n"),
    (sentences, " "),
    (str.split, " "),  # words
)


PART = re.compile(r" \(part \d+\)$")
"""How a location names one part of a section, page or block too long for one chunk (``part_label``)."""


def part_label(number: int) -> str:
    """The end of the location of part ``number`` of a section, page or block split into several chunks."""
    return f" (part {number})"


def _split(text: str, max_chars: int) -> list[str]:
    """``text`` in parts of at most ``max_chars``, split at paragraph ends, then at line ends that end a sentence or
    start a list item, then at sentence ends, then at spaces. Every word stays: a single word longer than
    ``max_chars`` is a part of its own."""
    text = text.strip()
    if not text:
        return []
    return _pack(_units(text, 0, max_chars), max_chars)


def _units(text: str, level: int, max_chars: int) -> list[tuple[str, str]]:
    """``text`` as (separator before it, piece) pairs, each piece at most ``max_chars`` where a boundary allows."""
    if len(text) <= max_chars or level == len(_LEVELS):
        return [("", text)]
    split, sep = _LEVELS[level]
    out: list[tuple[str, str]] = []
    for piece in (p.strip() for p in split(text)):
        if piece:
            first, *rest = _units(piece, level + 1, max_chars)
            out += [(sep if out else "", first[1]), *rest]
    return out


def _pack(units: list[tuple[str, str]], max_chars: int) -> list[str]:
    """Consecutive pieces joined by their separators into parts of at most ``max_chars`` (a longer piece alone)."""
    parts: list[str] = []
    current = ""
    for sep, piece in units:
        if current and len(current) + len(sep) + len(piece) > max_chars:
            parts.append(current)
            current = piece
        else:
            current = f"{current}{sep}{piece}" if current else piece
    if current:
        parts.append(current)
    return parts


def _page_equivalents(chunks: Iterable[Chunk]) -> int:
    return max(1, math.ceil(sum(len(c.text) for c in chunks) / 3000))


# ---------------------------------------------------------------------------------------------------------------
# Table rows (CSV, Excel, and the tables of Word and HTML documents)


def _id_column(header: Sequence[str], id_columns: Sequence[str]) -> int:
    """The index of the identifier column: the first of ``id_columns`` (case-insensitive) the header has, or -1."""
    lowered = [h.lower().replace(" ", "_") for h in header]
    return next((lowered.index(c.lower()) for c in id_columns if c.lower() in lowered), -1)


def _row_chunk(header: Sequence[str], cells: Sequence[str], id_col: int, where: str, extra: str = "",
               name: Callable[[int], str] = lambda i: f"column {i + 1}") -> Chunk:
    """A row as ``header: value`` pairs (empty cells left out; a cell without a header named by ``name``), located
    ``where`` with its identifier in brackets, then ``extra``."""
    fields = [(header[i] if i < len(header) and header[i] else name(i), c) for i, c in enumerate(cells) if c]
    body = "\n".join(f"{h}: {c}" for h, c in fields)
    value = cells[id_col] if 0 <= id_col < len(cells) else ""
    row_id = normalize_id(value) if value else ""
    where += f" ({header[id_col]} {value})" if row_id else ""
    return Chunk(where + extra, body, row_id, "row")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------------
# The outline of a structured document (Markdown, Word, HTML)


class _Outline:
    """Chunks of a document with headings, built as the document is walked.

    A section's text is one chunk (parts when long) located by its heading path, the path prefixed to its text; text
    before the first heading is located by position (``lines 3-9``, ``paragraphs 1-4``). A table becomes one chunk
    per row, where it stands: the section's text before it and after it are parts of the section. A heading with
    nothing under it (no text, no sub-heading), or right over a table, is a part of its own (its path alone), so
    that no heading is lost and each comes before what it heads.
    """

    def __init__(self, max_chars: int, id_columns: Sequence[str], unit: str) -> None:
        self.max_chars = max_chars
        self.id_columns = id_columns
        self.unit = unit
        self.chunks: list[Chunk] = []
        self.path: list[tuple[int, str]] = []
        self.body: list[tuple[str, str]] = []  # (separator before it, block)
        self.first = self.last = 0  # positions of the body's first and last block
        self.pending: list[tuple[str, int, int] | Chunk] = []  # the section's texts (and positions) and rows
        self.tables = 0

    def heading(self, level: int, title: str) -> None:
        """A heading of ``level`` (smaller is higher) starts a section."""
        title = _one_line(title)
        if not title:
            return
        self._end_section(level)
        self.path = [*(p for p in self.path if p[0] < level), (level, title)]

    def add(self, block: str, position: int, sep: str = "\n\n") -> None:
        """A block of text (a paragraph, a list item, a line) at ``position``, after ``sep``."""
        if not block.strip():
            if self.body:  # a blank line still separates paragraphs (Markdown)
                self.body.append((sep, ""))
            return
        if not self.body:
            self.first = position
        self.body.append((sep if self.body else "", block))
        self.last = position

    def table(self, rows: Sequence[Sequence[str]], position: int) -> None:
        """A table's rows (cells as text, the first row with text its header) at ``position``."""
        self.tables += 1
        numbered = [(n, [_one_line(c) for c in r]) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]
        if len(numbered) < 2 or max(sum(1 for c in r if c) for _, r in numbered) < 2:
            # a box or a one-line table: its text, cell by cell
            for _, cells in numbered:
                self.add(" | ".join(c for c in cells if c), position, "\n")
            return
        self._cut()
        if self.path and all(isinstance(item, Chunk) for item in self.pending):
            self.pending.append(("", 0, 0))  # the section opens with a table: its heading comes first, as a part
        header = numbered[0][1]
        id_col = _id_column(header, self.id_columns)
        where = f" in section {' > '.join(t for _, t in self.path)}" if self.path else ""
        for n, cells in numbered[1:]:
            self.pending.append(_row_chunk(header, cells, id_col, f"table {self.tables} row {n}", where))

    def finish(self) -> Parsed:
        self._end_section(0)
        return Parsed(tuple(self.chunks), _page_equivalents(self.chunks))

    def _cut(self) -> None:
        """The section's text so far becomes one of its parts."""
        text = "".join(f"{sep}{block}" for sep, block in self.body).strip()
        if text:
            self.pending.append((text, self.first, self.last))
        self.body = []

    def _end_section(self, next_level: int) -> None:
        """The section ends where a heading of ``next_level`` starts (0: the document's end)."""
        self._cut()
        where = " > ".join(t for _, t in self.path)
        if self.path and not self.pending and next_level <= self.path[-1][0]:
            self.pending.append(("", 0, 0))  # a heading with nothing under it: its path alone, or its words are lost
        split = [item if isinstance(item, Chunk) else (_split(item[0], self.max_chars) or [""], item[1], item[2])
                 for item in self.pending]
        numbered = bool(self.path) and sum(len(item[0]) for item in split if not isinstance(item, Chunk)) > 1
        number = 0
        for item in split:
            if isinstance(item, Chunk):
                self.chunks.append(item)
                continue
            parts, first, last = item
            for i, part in enumerate(parts, 1):
                number += 1
                if self.path:
                    location = f"section {where}" + (part_label(number) if numbered else "")
                    self.chunks.append(Chunk(location, f"{where}\n{part}" if part else where, kind="section"))
                else:
                    location = f"{self.unit} {first}-{last}" + (part_label(i) if len(parts) > 1 else "")
                    self.chunks.append(Chunk(location, part, kind="text"))
        self.pending = []


# ---------------------------------------------------------------------------------------------------------------
# Markdown and plain text


def read_markdown(text: str, max_chars: int) -> Parsed:
    """One chunk per section (parts when long), located by its heading path, the path prefixed to its text; text
    before the first heading located by its lines. ``#`` lines inside fenced code are text, not headings."""
    outline = _Outline(max_chars, (), "lines")
    fence = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = None if fence else HEADING.match(line)
        f = FENCE.match(line)
        if f:
            fence = "" if fence and f.group(1) == fence else fence or f.group(1)
        if m:
            outline.heading(len(m.group(1)), m.group(2))
        else:
            outline.add(line, n, "\n")
    return outline.finish()


def read_text(text: str, max_chars: int) -> Parsed:
    """Paragraphs grouped up to ``max_chars``, located by their line numbers; a longer paragraph is split into
    parts (at line ends that end a sentence, sentence ends, then spaces), never cut."""
    paragraphs: list[tuple[int, int, str]] = []  # first line, last line, text
    block: list[str] = []
    first = 0
    lines = text.splitlines()
    for n, line in enumerate([*lines, ""], 1):
        if line.strip():
            if not block:
                first = n
            block.append(line)
        elif block:
            paragraphs.append((first, n - 1, "\n".join(block)))
            block = []
    chunks: list[Chunk] = []
    group: list[tuple[int, int, str]] = []

    def flush() -> None:
        if group:
            body = "\n\n".join(p[2] for p in group)
            parts = _split(body, max_chars)
            for i, part in enumerate(parts, 1):
                where = f"lines {group[0][0]}-{group[-1][1]}" + (part_label(i) if len(parts) > 1 else "")
                chunks.append(Chunk(where, part, kind="text"))
            group.clear()

    for para in paragraphs:
        if group and sum(len(p[2]) + 2 for p in group) + len(para[2]) > max_chars:
            flush()
        group.append(para)
    flush()
    return Parsed(tuple(chunks), max(1, math.ceil(len(text) / 3000)))


# ---------------------------------------------------------------------------------------------------------------
# PDF


def read_pdf(data: bytes, max_chars: int) -> Parsed:
    """One chunk per page (split into parts when long), located by page number; text through pypdf."""
    try:
        from pypdf import PdfReader

        reader = PdfReader(io.BytesIO(data), strict=False)
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # pypdf raises many types for a damaged file
        raise UnreadableError(f"not a readable PDF: {type(exc).__name__}: {exc}") from exc
    if not pages:
        raise UnreadableError("the PDF has no pages")
    chunks: list[Chunk] = []
    for number, text in enumerate(pages, 1):
        parts = _split(re.sub(r"[ \t]+", " ", text), max_chars)
        for i, part in enumerate(parts, 1):
            chunks.append(Chunk(f"page {number}" + (part_label(i) if len(parts) > 1 else ""), part, kind="page"))
    if pages and not chunks:
        raise UnreadableError("the PDF has no extractable text (a scan without a text layer?)")
    return Parsed(tuple(chunks), len(pages))


# ---------------------------------------------------------------------------------------------------------------
# CSV and Excel


def _csv_rows(text: str) -> list[list[str]]:
    """The non-empty rows of a CSV, split at the delimiter (``,`` ``;`` tab ``|``) that gives the header at least
    two fields and the most rows of the header's length: a spreadsheet's semicolon export has commas in its text."""
    best: list[list[str]] = []
    best_score = -1
    for delimiter in ",;\t|":
        rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
        if not rows:
            return []
        score = sum(len(r) == len(rows[0]) for r in rows) if len(rows[0]) >= 2 else 0
        if score > best_score:
            best, best_score = rows, score
    return best


def read_csv(text: str, id_columns: Sequence[str]) -> Parsed:
    """One chunk per row, as ``header: value`` pairs; the identifier column (by name) identifies the row."""
    try:
        rows = _csv_rows(text)
    except csv.Error as exc:
        raise UnreadableError(f"not a readable CSV: {exc}") from exc
    if not rows:
        return Parsed((), 1)
    header = [h.strip() for h in rows[0]]
    if not all(header):
        raise UnreadableError("the header row has an empty column name")
    id_col = _id_column(header, id_columns)
    chunks: list[Chunk] = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise UnreadableError(f"row {n} has {len(row)} fields; the header has {len(header)} (ragged rows)")
        chunks.append(_row_chunk(header, [c.strip() for c in row], id_col, f"row {n}"))
    return Parsed(tuple(chunks), max(1, math.ceil(len(text) / 3000)))


def _cell_text(value: object) -> str:
    """A spreadsheet cell's value as it reads: ``12`` not ``12.0``, a date without a midnight time."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, datetime.datetime):
        return value.date().isoformat() if value.time() == datetime.time() else value.isoformat(sep=" ")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return _one_line(str(value))


def _sheet_chunks(name: str, rows: Iterable[tuple[int, list[str]]], max_chars: int,
                  id_columns: Sequence[str]) -> list[Chunk]:
    """A sheet's chunks: the first row with two filled cells or more is the header, each row after it one chunk;
    single-cell rows above the header (a title, a note) are text, and so is a sheet of one column."""
    from openpyxl.utils import get_column_letter

    header: list[str] | None = None
    id_col = -1
    texts: list[tuple[int, str]] = []
    chunks: list[Chunk] = []
    for n, cells in rows:
        filled = [c for c in cells if c]
        if not filled:
            continue
        if header is None:
            if len(filled) == 1:
                texts.append((n, filled[0]))
                continue
            header = cells
            id_col = _id_column(header, id_columns)
            continue
        chunks.append(_row_chunk(header, cells, id_col, f"sheet {name} row {n}",
                                 name=lambda i: f"column {get_column_letter(i + 1)}"))
    if texts:
        parts = _split("\n".join(t for _, t in texts), max_chars)
        where = f"sheet {name} rows {texts[0][0]}-{texts[-1][0]}"
        chunks[:0] = [Chunk(where + (part_label(i) if len(parts) > 1 else ""), part, kind="text")
                      for i, part in enumerate(parts, 1)]
    return chunks


def read_xlsx(data: bytes, max_chars: int, id_columns: Sequence[str]) -> Parsed:
    """Each worksheet's rows as ``header: value`` pairs, one chunk per row, located ``sheet NAME row N``; the
    identifier column (by name) identifies the row. Formulas read as the values Excel saved with them."""
    try:
        import openpyxl

        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a damaged file
        raise UnreadableError(f"not a readable Excel workbook: {type(exc).__name__}: {exc}") from exc
    chunks: list[Chunk] = []
    try:
        for sheet in book.worksheets:
            if not hasattr(sheet, "reset_dimensions"):
                continue  # a chart sheet
            sheet.reset_dimensions()  # the file's own dimensions may be wrong: read every row there is
            rows = ((n, [_cell_text(v) for v in values])
                    for n, values in enumerate(sheet.iter_rows(min_row=1, values_only=True), 1))
            chunks += _sheet_chunks(sheet.title, rows, max_chars, id_columns)
    except Exception as exc:
        raise UnreadableError(f"not a readable Excel workbook: {type(exc).__name__}: {exc}") from exc
    finally:
        book.close()
    return Parsed(tuple(chunks), _page_equivalents(chunks))


# ---------------------------------------------------------------------------------------------------------------
# Word


_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_MC_FALLBACK = "{http://schemas.openxmlformats.org/markup-compatibility/2006}Fallback"
# Not text: paragraph and run properties (their tab stops), deleted text, field codes, the older copy of a drawing.
_DOCX_SKIP = frozenset([f"{_W}pPr", f"{_W}rPr", f"{_W}del", f"{_W}instrText", _MC_FALLBACK])
_DOCX_BLOCKS = frozenset([f"{_W}p", f"{_W}tbl", f"{_W}sdt", f"{_W}sdtContent", f"{_W}customXml"])


def _docx_text(element: Any) -> str:
    """The text of a paragraph or cell element: runs, tabs and breaks; text boxes and nested paragraphs on lines
    of their own."""
    out: list[str] = []

    def walk(node: Any) -> None:
        for child in node:
            tag = child.tag
            if tag in _DOCX_SKIP:
                continue
            if tag == f"{_W}t":
                out.append(child.text or "")
            elif tag == f"{_W}tab":
                out.append("\t")
            elif tag in (f"{_W}br", f"{_W}cr"):
                out.append("\n")
            elif tag == f"{_W}noBreakHyphen":
                out.append("-")
            else:
                walk(child)
                if tag in (f"{_W}p", f"{_W}tc"):
                    out.append("\n")

    walk(element)
    return "\n".join(re.sub(r"[ \t\xa0]+", " ", line).strip() for line in "".join(out).splitlines()).strip()


def _docx_blocks(element: Any) -> Iterator[Any]:
    """The paragraphs and tables of a body or cell, in order, content controls opened."""
    for child in element:
        if child.tag in (f"{_W}p", f"{_W}tbl"):
            yield child
        elif child.tag in _DOCX_BLOCKS:
            yield from _docx_blocks(child)


class _WordLists:
    """List markers of Word paragraphs: ``1.`` ``2.`` for numbered lists, ``-`` for bullets, counted per list."""

    def __init__(self, document: Any) -> None:
        try:
            self.numbering: Any = document.part.numbering_part.element
        except (KeyError, NotImplementedError):
            self.numbering = None
        self.counts: dict[str, dict[int, int]] = {}

    def marker(self, p: Any, style: Any) -> tuple[str, int] | None:
        """The marker and level of paragraph ``p`` with ``style``, or None when it is not a list item."""
        num_pr = p.find(f"{_W}pPr/{_W}numPr")
        s = style
        while num_pr is None and s is not None:
            num_pr = s.element.find(f"{_W}pPr/{_W}numPr")
            s = s.base_style
        name = (style.name or "").lower() if style is not None else ""
        if num_pr is None:
            if not name.startswith("list bullet") and not name.startswith("list number"):
                return None
            num_id, level = f"style:{name}", 0
        else:
            num_id = _attr(num_pr.find(f"{_W}numId"), "0")
            level = _int(_attr(num_pr.find(f"{_W}ilvl"), "0"), 0)
            if num_id == "0":
                return None  # numbering switched off
        fmt, start = self._format(num_id, level)
        if fmt == "":
            fmt = "bullet" if "bullet" in name else "decimal"
        if fmt == "none":
            return "", level
        if fmt == "bullet":
            return "-", level
        levels = self.counts.setdefault(num_id, {})
        levels[level] = levels.get(level, start - 1) + 1
        for deeper in [k for k in levels if k > level]:
            del levels[deeper]
        return f"{levels[level]}.", level

    def _format(self, num_id: str, level: int) -> tuple[str, int]:
        """The number format (``decimal``, ``bullet``, ...; ``""`` unknown) and first number of a list level."""
        if self.numbering is None or num_id.startswith("style:"):
            return "", 1
        num = next((n for n in self.numbering.iterfind(f"{_W}num") if n.get(f"{_W}numId") == num_id), None)
        if num is None:
            return "", 1
        abstract = num.find(f"{_W}abstractNumId")
        abstract_id = abstract.get(f"{_W}val") if abstract is not None else None
        fmt, start = "", 1
        for definition in self.numbering.iterfind(f"{_W}abstractNum"):
            if definition.get(f"{_W}abstractNumId") == abstract_id:
                for lvl in definition.iterfind(f"{_W}lvl"):
                    if lvl.get(f"{_W}ilvl") == str(level):
                        fmt = _attr(lvl.find(f"{_W}numFmt"), "")
                        start = _int(_attr(lvl.find(f"{_W}start"), "1"), 1)
        for override in num.iterfind(f"{_W}lvlOverride"):
            if override.get(f"{_W}ilvl") == str(level) and override.find(f"{_W}startOverride") is not None:
                start = _int(_attr(override.find(f"{_W}startOverride"), "1"), 1)
        return fmt, start


def _attr(element: Any, default: str) -> str:
    """An element's ``w:val``, or ``default`` when there is no element or no value."""
    return str(element.get(f"{_W}val", default)) if element is not None else default


def _int(value: str | None, default: int) -> int:
    return int(value) if value and re.fullmatch(r"-?[0-9]{1,9}", value.strip()) else default


def _heading_level(p: Any, style: Any) -> int | None:
    """A heading paragraph's level (``Title`` 0, ``Heading N`` N, or its outline level + 1), else None."""
    outline = p.find(f"{_W}pPr/{_W}outlineLvl")
    s = style
    for _ in range(10):
        if s is None:
            break
        name = (s.name or "").lower()
        if name == "title":
            return 0
        m = re.fullmatch(r"heading (\d)", name)
        if m:
            return int(m.group(1))
        if outline is None:
            outline = s.element.find(f"{_W}pPr/{_W}outlineLvl")
        s = s.base_style
    level = _int(_attr(outline, "9"), 9)
    return level + 1 if 0 <= level < 9 else None


def _docx_table(tbl: Any) -> list[list[str]]:
    """A table's rows of cell texts; a cell merged over rows repeats its text, one merged over columns is followed
    by empty cells."""
    rows: list[list[str]] = []
    above: dict[int, str] = {}  # text of the cell that a vertical merge continues, by grid column
    for tr in _docx_children(tbl, "tr"):
        row: list[str] = []
        for tc in _docx_children(tr, "tc"):
            props = tc.find(f"{_W}tcPr")
            span = props.find(f"{_W}gridSpan") if props is not None else None
            merge = props.find(f"{_W}vMerge") if props is not None else None
            column = len(row)
            text = _one_line(_docx_text(tc))
            if merge is not None and _attr(merge, "continue") != "restart":
                text = above.get(column, "")
            above[column] = text
            row += [text] + [""] * (min(max(_int(_attr(span, "1"), 1), 1), 100) - 1)
        rows.append(row)
    return rows


def _docx_children(element: Any, name: str) -> Iterator[Any]:
    for child in element:
        if child.tag == f"{_W}{name}":
            yield child
        elif child.tag in _DOCX_BLOCKS:
            yield from _docx_children(child, name)


def read_docx(data: bytes, max_chars: int, id_columns: Sequence[str]) -> Parsed:
    """A Word document along its structure: paragraphs in ``Heading N`` (or ``Title``) styles make the heading path
    of the sections after them; list paragraphs keep their ``1.`` or ``-`` marker; a table is one chunk per row,
    its first row the field names. Text before the first heading is located by paragraph numbers."""
    try:
        import docx
        from docx.text.paragraph import Paragraph

        document = docx.Document(io.BytesIO(data))
        lists = _WordLists(document)
        outline = _Outline(max_chars, id_columns, "paragraphs")
        number = 0
        in_list = False
        for block in _docx_blocks(document.element.body):
            if block.tag == f"{_W}tbl":
                outline.table(_docx_table(block), number + 1)
                in_list = False
                continue
            text = _docx_text(block)
            if not text:
                continue
            number += 1
            style = Paragraph(block, document).style
            level = _heading_level(block, style)
            if level is not None:
                outline.heading(level, text)
                in_list = False
                continue
            item = lists.marker(block, style)
            if item is None:
                outline.add(text, number)
                in_list = False
            else:
                marker, depth = item
                line = "  " * depth + (f"{marker} " if marker else "") + _one_line(text)
                outline.add(line, number, "\n" if in_list else "\n\n")
                in_list = True
        return outline.finish()
    except Exception as exc:  # python-docx and lxml raise many types for a damaged file
        raise UnreadableError(f"not a readable Word document: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# HTML


class _HtmlReader(HTMLParser):
    """An HTML page walked into an outline: ``h1``-``h6`` headings, paragraphs, list items with their markers,
    table rows; scripts, styles, the head and ``<nav>`` menus left out."""

    # Not the page's content: code, styles, the head's title, and the site's navigation menus.
    SKIP = frozenset(["script", "style", "template", "title", "svg", "math", "noscript", "object", "iframe", "nav"])
    BLOCK = frozenset(["p", "div", "section", "article", "main", "header", "footer", "aside", "blockquote",
                       "pre", "address", "figure", "figcaption", "dl", "dt", "dd", "hr", "form", "fieldset",
                       "legend", "details", "summary", "center", "body", "html"])
    HEAD = frozenset(["head", "meta", "link", "base", "title", "style", "script", "noscript", "template"])
    HEADINGS: ClassVar[dict[str, int]] = {f"h{n}": n for n in range(1, 7)}

    def __init__(self, outline: _Outline) -> None:
        super().__init__(convert_charrefs=True)
        self.outline = outline
        self.skip = 0
        self.in_head = False
        self.pre = 0
        self.buf: list[str] = []
        self.line = 0  # where the buffered text starts
        self.heading: tuple[int, list[str]] | None = None
        self.lists: list[list[int]] = []  # per open list: [ordered, last number, item open]
        self.prefix = ""  # the marker the next flushed text takes
        self.last_was_item = False
        self.tables: list[dict[str, Any]] = []

    # -- text

    def handle_data(self, data: str) -> None:
        if self.in_head and not self.skip and data.strip():
            self.in_head = False  # text ends the head, as in a browser
        if self.skip or self.in_head:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
        if self.tables:
            table = self.tables[-1]
            (table["cell"] if table["cell"] is not None else table["loose"]).append(data)
        elif self.heading is not None:
            self.heading[1].append(data)
        else:
            if data.strip() and not "".join(self.buf).strip():
                self.line = self.getpos()[0]
            self.buf.append(data)

    def flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        lines = [line.rstrip() if self.pre else _one_line(line) for line in text.split("\n")]
        text = "\n".join(line for line in lines if line.strip())
        if not text.strip():
            return
        if self.prefix:
            self.outline.add(self.prefix + text, self.line, "\n" if self.last_was_item else "\n\n")
            self.prefix, self.last_was_item = "", True
        else:
            self.outline.add(text, self.line)
            self.last_was_item = False

    # -- tags

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skip += 1
            return
        if tag == "head":
            self.in_head = True
            return
        if tag not in self.HEAD:
            self.in_head = False  # the body starts, whether or not the page says so
        if self.skip or self.in_head:
            return
        attr = dict(attrs)
        if self.tables:
            self._table_start(tag, attr)
        elif tag == "br":
            (self.heading[1] if self.heading is not None else self.buf).append("\n")
        elif tag in self.HEADINGS:
            self.flush()
            self.heading = (self.HEADINGS[tag], [])
        elif tag in ("ul", "ol", "menu"):
            self.flush()
            self.lists.append([tag == "ol", _int(attr.get("start"), 1) - 1, 0])
        elif tag == "li":
            self.flush()
            if not self.lists:
                self.lists.append([0, 0, 0])
            current = self.lists[-1]
            current[1] = _int(attr.get("value"), current[1] + 1)
            current[2] = 1
            marker = f"{current[1]}." if current[0] else "-"
            self.prefix = "  " * (len(self.lists) - 1) + marker + " "
            self.line = self.getpos()[0]
        elif tag == "table":
            self.flush()
            self.tables.append({"rows": [], "row": None, "cell": None, "span": 1, "loose": [],
                                "line": self.getpos()[0]})
        elif tag in self.BLOCK:
            if self.lists and self.lists[-1][2]:
                self.buf.append(" ")  # a paragraph inside a list item stays in the item
            else:
                self.flush()
            if tag == "pre":
                self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
            return
        if tag == "head":
            self.in_head = False
            return
        if self.skip or self.in_head:
            return
        if self.tables:
            self._table_end(tag)
        elif tag in self.HEADINGS and self.heading is not None:
            level, parts = self.heading
            self.heading = None
            self.outline.heading(level, "".join(parts))
            self.last_was_item = False
        elif tag == "li":
            self.flush()
            if self.lists:
                self.lists[-1][2] = 0
        elif tag in ("ul", "ol", "menu"):
            self.flush()
            if self.lists:
                self.lists.pop()
        elif tag in self.BLOCK:
            if not (self.lists and self.lists[-1][2]):
                self.flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    # -- tables

    def _table_start(self, tag: str, attr: dict[str, str | None]) -> None:
        table = self.tables[-1]
        if tag == "table":  # a table in a table: its text goes into the outer cell
            if table["cell"] is None:
                table["cell"] = []
            self.tables.append({"rows": [], "row": None, "cell": None, "span": 1, "loose": [], "line": 0})
        elif tag == "tr":
            self._close_row(table)
            table["row"] = []
        elif tag in ("td", "th"):
            self._close_cell(table)
            if table["row"] is None:
                table["row"] = []
            table["cell"] = []
            table["span"] = min(max(_int(attr.get("colspan"), 1), 1), 100)
        elif tag == "br" or tag in self.BLOCK or tag == "li":
            (table["cell"] if table["cell"] is not None else table["loose"]).append(" ")

    def _table_end(self, tag: str) -> None:
        table = self.tables[-1]
        if tag in ("td", "th"):
            self._close_cell(table)
        elif tag == "tr":
            self._close_row(table)
        elif tag == "table":
            self._close_row(table)
            self.tables.pop()
            loose = _one_line("".join(table["loose"]))
            if self.tables:  # nested: the outer cell gets its text
                outer = self.tables[-1]
                texts = [loose, *(c for r in table["rows"] for c in r if c)]
                (outer["cell"] if outer["cell"] is not None else outer["loose"]).append(
                    " " + " | ".join(t for t in texts if t) + " ")
                return
            if loose:
                self.outline.add(loose, table["line"])
            self.outline.table(table["rows"], table["line"])
            self.last_was_item = False

    @staticmethod
    def _close_cell(table: dict[str, Any]) -> None:
        if table["cell"] is not None:
            if table["row"] is None:
                table["row"] = []
            table["row"] += [_one_line("".join(table["cell"]))] + [""] * (table["span"] - 1)
            table["cell"] = None

    def _close_row(self, table: dict[str, Any]) -> None:
        self._close_cell(table)
        if table["row"] is not None:
            table["rows"].append(table["row"])
            table["row"] = None

    def finish(self) -> Parsed:
        self.close()
        while self.tables:
            self._table_end("table")
        if self.heading is not None:
            self.buf += self.heading[1]
            self.heading = None
        self.flush()
        return self.outline.finish()


def read_html(text: str, max_chars: int, id_columns: Sequence[str]) -> Parsed:
    """An HTML page (an intranet page saved or exported) along its structure: ``h1``-``h6`` make the heading path;
    paragraphs and list items (with ``1.`` or ``-``) are the sections' text; a table is one chunk per row, its first
    row the field names. Scripts, styles and ``<nav>`` menus are left out; text before the first heading is located
    by its lines."""
    reader = _HtmlReader(_Outline(max_chars, id_columns, "lines"))
    try:
        reader.feed(text)
        return reader.finish()
    except (AssertionError, ValueError) as exc:  # what html.parser raises for markup it cannot take
        raise UnreadableError(f"not readable HTML: {exc}") from exc


def _decode_html(data: bytes) -> str:
    """An HTML file's text: UTF-8, else the charset its ``<meta>`` declares (an export from Windows)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        m = re.search(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_-]+)""", data[:4096], re.IGNORECASE)
        if m:
            try:
                return data.decode(codecs.lookup(m.group(1).decode()).name)
            except (LookupError, UnicodeDecodeError):
                pass
        raise UnreadableError(f"not UTF-8 text (byte {exc.start}) and no charset it declares decodes it") from exc


# ---------------------------------------------------------------------------------------------------------------


def read_document(path: Path, data: bytes, cfg: KnowledgeConfig) -> Parsed:
    """Chunks of one file, by its kind; ``UnreadableError`` says why it cannot be read."""
    kind = KINDS[path.suffix.lower()]
    if kind == "pdf":
        return read_pdf(data, cfg.max_chunk_chars)
    if kind == "docx":
        return read_docx(data, cfg.max_chunk_chars, cfg.id_columns)
    if kind == "xlsx":
        return read_xlsx(data, cfg.max_chunk_chars, cfg.id_columns)
    if kind == "html":
        return read_html(_decode_html(data), cfg.max_chunk_chars, cfg.id_columns)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableError(f"not UTF-8 text (byte {exc.start})") from exc
    if kind == "csv":
        return read_csv(text, cfg.id_columns)
    if kind == "markdown":
        return read_markdown(text, cfg.max_chunk_chars)
    return read_text(text, cfg.max_chunk_chars)


def find_documents(paths: Iterable[str]) -> Iterator[tuple[Path, str]]:
    """Every document under ``paths`` (files or directories), with the name it is cited by, in a stable order."""
    for entry in paths:
        root = Path(entry).expanduser()
        if root.is_file():
            yield root.resolve(), root.name
        elif root.is_dir():
            for p in sorted(root.rglob("*")):
                # not hidden files, nor the lock files Office leaves beside an open document (~$manual.docx)
                if p.is_file() and p.suffix.lower() in KINDS and not p.name.startswith((".", "~$")):
                    yield p.resolve(), p.relative_to(root).as_posix()
        else:
            log.warning("knowledge path %s does not exist; skipped", root)

"""Documents read into passages along their structure: a Markdown section, a text block, a PDF page, a table row."""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import KnowledgeConfig
from .identifiers import normalize_id

log = logging.getLogger(__name__)

KINDS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".pdf": "pdf", ".csv": "csv"}
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")

@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document."""

    location: str
    """Where it is: ``section Coolant > Mixing``, ``page 3``, ``row 14 (code A412)``, ``lines 1-12``."""
    text: str
    """Its text (a CSV row as ``header: value`` pairs; a section with its heading path)."""
    row_id: str = ""
    """A CSV row's identifier (its identifier column's value), normalised."""
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


def _split(text: str, max_chars: int) -> list[str]:
    """``text`` in parts of at most ``max_chars``, cut at paragraph ends (a longer paragraph at word ends)."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        pieces += [para] if len(para) <= max_chars else _pack(para.split(), " ", max_chars)
    return _pack(pieces, "\n\n", max_chars)


def _pack(pieces: list[str], sep: str, max_chars: int) -> list[str]:
    """Consecutive pieces joined by ``sep`` into parts of at most ``max_chars`` (a longer piece stays whole)."""
    parts: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > max_chars:
            parts.append(current)
            current = piece
        else:
            current = f"{current}{sep}{piece}" if current else piece
    if current:
        parts.append(current)
    return parts


def read_markdown(text: str, max_chars: int) -> Parsed:
    """One chunk per section (split when long), located by its heading path, the path prefixed to its text."""
    chunks: list[Chunk] = []
    path: list[str] = []
    body: list[str] = []
    start_line = 1

    def flush(end_line: int) -> None:
        content = "\n".join(body).strip()
        if not content:
            return
        where = " > ".join(path) if path else f"lines {start_line}-{end_line}"
        parts = _split(content, max_chars)
        for i, part in enumerate(parts, 1):
            location = f"section {where}" if path else where
            if len(parts) > 1:
                location += f" (part {i})"
            chunks.append(Chunk(location, (" > ".join(path) + "\n" if path else "") + part,
                                kind="section" if path else "text"))

    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        m = HEADING.match(line)
        if m:
            flush(n - 1)
            level = len(m.group(1))
            path = [*path[: level - 1], m.group(2).strip()]
            body = []
            start_line = n + 1
        else:
            body.append(line)
    flush(len(lines))
    return Parsed(tuple(chunks), max(1, math.ceil(len(text) / 3000)))


def read_text(text: str, max_chars: int) -> Parsed:
    """Paragraphs grouped up to ``max_chars``, located by their line numbers."""
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
    for para in paragraphs:
        if group and sum(len(p[2]) + 2 for p in group) + len(para[2]) > max_chars:
            chunks.append(_text_chunk(group, max_chars))
            group = []
        group.append(para)
    if group:
        chunks.append(_text_chunk(group, max_chars))
    return Parsed(tuple(chunks), max(1, math.ceil(len(text) / 3000)))


def _text_chunk(group: list[tuple[int, int, str]], max_chars: int) -> Chunk:
    body = "\n\n".join(p[2] for p in group)
    return Chunk(f"lines {group[0][0]}-{group[-1][1]}", body if len(body) <= max_chars else body[:max_chars])


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
            chunks.append(Chunk(f"page {number}" + (f" (part {i})" if len(parts) > 1 else ""), part, kind="page"))
    if pages and not chunks:
        raise UnreadableError("the PDF has no extractable text (a scan without a text layer?)")
    return Parsed(tuple(chunks), len(pages))


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
    lowered = [h.lower().replace(" ", "_") for h in header]
    id_col = next((lowered.index(c.lower()) for c in id_columns if c.lower() in lowered), -1)
    chunks: list[Chunk] = []
    for n, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise UnreadableError(f"row {n} has {len(row)} fields; the header has {len(header)} (ragged rows)")
        cells = [c.strip() for c in row]
        body = "\n".join(f"{h}: {c}" for h, c in zip(header, cells, strict=True) if c)
        row_id = normalize_id(cells[id_col]) if id_col >= 0 and cells[id_col] else ""
        where = f"row {n}" + (f" ({header[id_col]} {cells[id_col]})" if row_id else "")
        chunks.append(Chunk(where, body, row_id, kind="row"))
    return Parsed(tuple(chunks), max(1, math.ceil(len(text) / 3000)))


def read_document(path: Path, data: bytes, cfg: KnowledgeConfig) -> Parsed:
    """Chunks of one file, by its kind; ``UnreadableError`` says why it cannot be read."""
    kind = KINDS[path.suffix.lower()]
    if kind == "pdf":
        return read_pdf(data, cfg.max_chunk_chars)
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
                if p.is_file() and p.suffix.lower() in KINDS and not p.name.startswith("."):
                    yield p.resolve(), p.relative_to(root).as_posix()
        else:
            log.warning("knowledge path %s does not exist; skipped", root)

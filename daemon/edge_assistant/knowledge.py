"""The plant's own documents: read, chunked along their structure, indexed in SQLite, retrieved per question.

Index (one SQLite file, FTS5 compiled into Python's ``sqlite3``)::

    documents (path, name, sha256, kind, pages, chunks)        one row per file, its content hash
    chunks (document, ord, location, text, row_id)             a Markdown section, a text block, a PDF page, a CSV row
    chunks_fts (text)                                          FTS5, Porter stemming; rowid = chunk id
    identifiers (ident, chunk, primary_row)                    alarm codes, part numbers, switch names, normalised

FTS5's tokenizer splits ``HW-4410`` into ``hw`` and ``4410``, so identifiers get their own exact-match table,
filled by the indexer: a CSV row's identifier column, and identifier-like words (letters and digits, or numbers
of three digits or more) anywhere.

Retrieval: identifiers named in the question first (a question naming an identifier that no document has finds
nothing: the documents do not cover it), then BM25 over the chunks, for the question's words and for its two-word
terms where the documents hold them as written (``way oil``). A chunk counts as covering the question when
it holds enough of the question's words, each weighted by its rarity in the documents (``min_coverage``): a
question whose rare words are nowhere in the documents is not covered, whatever BM25 ranks first.

Answers in the documents' own words: a question naming a table row by its identifier gets the row
(``answer_from_row``); any other covered question gets the sentences of the retrieved passages that answer it
(``quote_answer``), scored by the question's rare words and two-word terms, its heading's words, and whether they
hold the kind of answer asked for (a number, an interval, the steps). Nothing is paraphrased.

Indexing runs in one transaction: a kill in the middle leaves the previous index as it was. Files whose content
hash is unchanged are not read again. A file that cannot be read is named in one log line and skipped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import KnowledgeConfig
from .errors import KnowledgeError
from .messages import Passage, SourceRef

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
KINDS = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".pdf": "pdf", ".csv": "csv"}
EXCERPT_CHARS = 300
CANDIDATES = 24

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, name TEXT NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
  pages INTEGER NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY, document INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL,
  location TEXT NOT NULL, text TEXT NOT NULL, row_id TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS identifiers (ident TEXT NOT NULL, chunk INTEGER NOT NULL, primary_row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS identifiers_ident ON identifiers(ident);
CREATE INDEX IF NOT EXISTS identifiers_chunk ON identifiers(chunk);
"""

# Words that carry no subject: question words ("how often", "how many"), auxiliaries, pronouns, filler verbs.
STOPWORDS = frozenset([
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "anything", "are", "as", "at",
    "be", "been", "before", "being", "below", "between", "both", "but", "by", "can", "correct", "could", "describe",
    "did", "do", "does", "doing", "done", "during", "each", "either", "else", "ever", "explain", "find", "for",
    "from", "get", "give", "go", "going", "had", "has", "have", "having", "he", "her", "here", "hers", "him", "his",
    "how", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "know", "let", "like", "long", "many",
    "may", "me", "mean", "means", "meant", "might", "more", "most", "much", "must", "my", "need", "needs", "no",
    "nor", "not", "now", "of", "off", "often", "on", "once", "only", "or", "other", "our", "out", "over", "own",
    "please", "right", "say", "see", "shall", "she", "should", "so", "some", "something", "such", "tell", "than",
    "that", "the", "their", "them", "then", "there", "these", "they", "this", "those", "through", "to", "too",
    "under", "until", "up", "us", "use", "used", "using", "usually", "very", "want", "was", "way", "we", "were",
    "what", "whats", "when", "where", "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your",
    "yours",
    # verbs that say how a question is put, not what it is about ("how long does it take")
    "take", "takes", "took", "taken", "make", "makes", "happen", "happens", "happened", "go", "goes", "went",
    "come", "comes", "put", "puts", "keep", "keeps", "show", "showing", "shows", "wrong", "something", "anyone",
])

TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*[A-Za-z0-9]|[A-Za-z0-9]")
WORD = re.compile(r"[^\W_]+", re.UNICODE)
UNIT = re.compile(r"^\d+(?:st|nd|rd|th|mm|cm|km|m|v|kv|mv|a|ma|kw|w|bar|psi|rpm|c|f|k|l|ml|kg|g|nm|s|ms|min|h|hz|"
                  r"khz|mhz|x)$", re.IGNORECASE)
SPACED_ID = re.compile(r"(?<![\w-])[A-Za-z]{1,4}\s+\d{3,}(?![\w-])")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def identifiers_in(text: str) -> list[str]:
    """Identifier-like words of ``text``, normalised (upper case, no ``-`` or ``_``), in order, no repeats.

    An identifier holds a digit and either a letter (``A412``, ``HW-4410``, ``QF5``) or three digits or more
    (``1012``); ordinals and measurements (``2nd``, ``24V``, ``10mm``) are not identifiers.
    """
    out: list[str] = []
    for m in SPACED_ID.finditer(text):  # "hw 4410" as people say it for HW-4410
        norm = normalize_id(m.group(0))
        if norm not in out:
            out.append(norm)
    for m in TOKEN.finditer(text):
        tok = m.group(0)
        if not any(c.isdigit() for c in tok) or UNIT.match(tok):
            continue
        has_alpha = any(c.isalpha() for c in tok)
        digits = sum(c.isdigit() for c in tok)
        if (has_alpha and len(tok) >= 2) or (not has_alpha and digits >= 3):
            norm = normalize_id(tok)
            if norm not in out:
                out.append(norm)
    return out


def question_words(text: str) -> list[str]:
    """The content words of a question, lower case, in order, no repeats: no stop words, no single letters."""
    return list(dict.fromkeys(w for w in (m.group(0).lower() for m in WORD.finditer(text))
                              if w not in STOPWORDS and len(w) > 1))


PHRASE_WORDS = frozenset(["way", "out", "up", "off", "down", "over", "under", "right", "left", "long"])
"""Stop words that still make a term next to a content word: ``way oil``, ``lock out``, ``top up``."""


def question_phrases(text: str) -> list[str]:
    """Adjacent word pairs of a question that may be one term (``way oil``, ``main switch``): two content words,
    or a content word and one of ``PHRASE_WORDS``. They count only where the documents hold them as written."""
    words = [m.group(0).lower() for m in WORD.finditer(text)]
    out: list[str] = []
    for a, b in itertools.pairwise(words):
        content = [w not in STOPWORDS and len(w) > 1 for w in (a, b)]
        if all(content) or (any(content) and {a, b} & PHRASE_WORDS):
            out.append(f"{a} {b}")
    return list(dict.fromkeys(out))


def normalize_id(value: str) -> str:
    """``hw-4410`` and ``HW_4410`` and ``HW 4410`` are the same identifier: ``HW4410``."""
    return re.sub(r"[\s_-]+", "", value).upper()


# -- reading documents ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document."""

    location: str
    """Where it is: ``section Coolant > Mixing``, ``page 3``, ``row 14 (code A412)``, ``lines 1-12``."""
    text: str
    """Its text (a CSV row as ``header: value`` pairs; a section with its heading path)."""
    row_id: str = ""
    """A CSV row's identifier (its identifier column's value), normalised."""


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
            chunks.append(Chunk(location, (" > ".join(path) + "\n" if path else "") + part))

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
            chunks.append(Chunk(f"page {number}" + (f" (part {i})" if len(parts) > 1 else ""), part))
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
        chunks.append(Chunk(where, body, row_id))
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


# -- the index -----------------------------------------------------------------------------------------------------

@dataclass
class IndexReport:
    """What one indexing run did."""

    added: list[str] = field(default_factory=list)
    """Documents new to the index."""
    updated: list[str] = field(default_factory=list)
    """Documents whose content changed."""
    removed: list[str] = field(default_factory=list)
    """Documents no longer present."""
    unchanged: int = 0
    """Documents left as they were (same content hash)."""
    skipped: list[str] = field(default_factory=list)
    """Documents that could not be read, each with why."""
    chunks: int = 0
    """Chunks in the index afterwards."""
    pages: int = 0
    """Pages read in this run."""
    seconds: float = 0.0
    """Wall time of the run."""
    digest: str = ""
    """The index's digest afterwards."""


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise KnowledgeError(f"{path}: cannot open the knowledge index: {exc}") from exc
    return conn


def build_index(cfg: KnowledgeConfig) -> IndexReport:
    """Bring the index up to date with the documents, in one transaction; unchanged files are not read."""
    t0 = time.monotonic()
    report = IndexReport()
    conn = _connect(cfg.index_path())
    try:
        conn.execute("BEGIN IMMEDIATE")
        known = {row[0]: (row[1], row[2]) for row in conn.execute("SELECT path, id, sha256 FROM documents")}
        seen: set[str] = set()
        for path, name in find_documents(cfg.paths):
            key = str(path)
            if key in seen:
                continue
            seen.add(key)
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.skipped.append(f"{name}: {exc.strerror or exc}")
                log.warning("knowledge: skipped %s: cannot read it: %s", path, exc)
                continue
            sha = hashlib.sha256(data).hexdigest()
            old = known.get(key)
            if old is not None and old[1] == sha:
                report.unchanged += 1
                continue
            log.info("knowledge: reading %s", path)
            try:
                parsed = read_document(path, data, cfg)
            except UnreadableError as exc:
                report.skipped.append(f"{name}: {exc}")
                log.warning("knowledge: skipped %s: %s", path, exc)
                if old is not None:  # the old version's passages would no longer be true to the file
                    _delete(conn, old[0])
                continue
            if old is not None:
                _delete(conn, old[0])
                report.updated.append(name)
            else:
                report.added.append(name)
            _insert(conn, key, name, sha, KINDS[path.suffix.lower()], parsed)
            report.pages += parsed.pages
        for key, (doc_id, _sha) in known.items():
            if key not in seen:
                _delete(conn, doc_id)
                report.removed.append(key)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
        report.chunks = int(conn.execute("SELECT count(*) FROM chunks").fetchone()[0])
        report.digest = _digest(conn)
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise KnowledgeError(f"{cfg.index_path()}: indexing failed, the previous index is kept: {exc}") from exc
    finally:
        conn.close()
    report.seconds = time.monotonic() - t0
    log.info("knowledge: %d added, %d updated, %d removed, %d unchanged, %d skipped; %d chunks (%.2f s)",
             len(report.added), len(report.updated), len(report.removed), report.unchanged, len(report.skipped),
             report.chunks, report.seconds)
    return report


def _delete(conn: sqlite3.Connection, doc_id: int) -> None:
    ids = [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document = ?", (doc_id,))]
    conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
    conn.executemany("DELETE FROM identifiers WHERE chunk = ?", [(i,) for i in ids])
    conn.execute("DELETE FROM chunks WHERE document = ?", (doc_id,))
    conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))


def _insert(conn: sqlite3.Connection, path: str, name: str, sha: str, kind: str, parsed: Parsed) -> None:
    cur = conn.execute("INSERT INTO documents (path, name, sha256, kind, pages, chunks) VALUES (?, ?, ?, ?, ?, ?)",
                       (path, name, sha, kind, parsed.pages, len(parsed.chunks)))
    doc_id = cur.lastrowid
    for order, chunk in enumerate(parsed.chunks):
        cur = conn.execute("INSERT INTO chunks (document, ord, location, text, row_id) VALUES (?, ?, ?, ?, ?)",
                           (doc_id, order, chunk.location, chunk.text, chunk.row_id))
        chunk_id = cur.lastrowid
        conn.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
        idents = {(i, 0) for i in identifiers_in(chunk.text)}
        if chunk.row_id:
            idents.discard((chunk.row_id, 0))
            idents.add((chunk.row_id, 1))
        conn.executemany("INSERT INTO identifiers (ident, chunk, primary_row) VALUES (?, ?, ?)",
                         [(i, chunk_id, p) for i, p in sorted(idents)])


def _digest(conn: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for name, sha in conn.execute("SELECT name, sha256 FROM documents ORDER BY name, sha256"):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()


# -- retrieval -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DocumentInfo:
    """One indexed document, for ``knowledge list``."""

    name: str
    path: str
    kind: str
    pages: int
    chunks: int
    sha256: str


RECENT_QUESTIONS = 8
"""Questions whose word lookups a retriever keeps (concurrent requests each retrieve, then weigh)."""


class Retriever:
    """Reads an index built by ``build_index``. Thread-safe (one connection under a lock)."""

    def __init__(self, path: Path, min_coverage: float = 0.5) -> None:
        if not path.is_file():
            raise KnowledgeError(f"{path}: no knowledge index (run `edge-assistant knowledge index`)")
        self.path = path
        self.min_coverage = min_coverage
        self._conn = _connect(path, readonly=True)
        self._lock = threading.Lock()
        self._recent: dict[str, dict[str, set[int]]] = {}  # question -> its words' chunks: retrieval, then weights
        with self._lock:
            self.digest = _digest(self._conn)
            self.size = int(self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0])

    @classmethod
    def open(cls, cfg: KnowledgeConfig) -> Retriever:
        """The retriever of the configured index."""
        return cls(cfg.index_path(), cfg.min_coverage)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    def documents(self) -> list[DocumentInfo]:
        """The indexed documents."""
        with self._lock:
            rows = self._conn.execute("SELECT name, path, kind, pages, chunks, sha256 FROM documents ORDER BY name")
            return [DocumentInfo(*r) for r in rows]

    def retrieve(self, question: str, limit: int = 3, strict_ids: bool = True) -> list[Passage]:
        """The passages that cover ``question``, best first; empty when the documents do not cover it."""
        return [p for p in self.search(question, limit, strict_ids) if p.coverage >= self.min_coverage][:limit]

    def search(self, question: str, limit: int = 5, strict_ids: bool = True) -> list[Passage]:
        """The best passages with their scores, covering or not (``knowledge search`` shows why).

        With ``strict_ids`` a question naming identifiers of which the documents know none is not covered; without
        (a PLC alarm's fields, where a tag may be in no document), its words are still searched.
        """
        with self._lock:
            idents = identifiers_in(question)
            by_id = self._by_identifier(idents) if idents else []
            if strict_ids and idents and not by_id:
                # An identifier no document has: the documents do not cover this question, whatever its words.
                return [replace(p, coverage=0.0) for p in self._by_words(question, limit)]
            if by_id:
                # The identifier's own passages only: a small model does best with few, relevant ones.
                return by_id[:limit]
            return self._by_words(question, limit)

    def _by_identifier(self, idents: Sequence[str]) -> list[Passage]:
        out: list[Passage] = []
        seen: set[int] = set()
        for ident in dict.fromkeys(idents):
            rows = self._conn.execute(
                "SELECT c.id, d.name, c.location, c.text, i.primary_row, c.row_id FROM identifiers i "
                "JOIN chunks c ON c.id = i.chunk JOIN documents d ON d.id = c.document WHERE i.ident = ? "
                "ORDER BY i.primary_row DESC, d.name, c.ord LIMIT 8", (ident,))
            for chunk_id, name, location, text, primary, row_id in rows:
                if chunk_id in seen:
                    continue
                seen.add(chunk_id)
                out.append(Passage(name, location, text, 0.0, 1.0, "identifier" if primary else "identifier-text",
                                   row_id))
        out.sort(key=lambda p: p.matched != "identifier")
        return out

    def weights(self, question: str) -> dict[str, float]:
        """The question's content words, each with its rarity in the documents (BM25's inverse document
        frequency): what a passage, or a sentence of it, must hold to answer the question."""
        with self._lock:
            return self._idf(self._holders(question))

    def _holders(self, question: str) -> dict[str, set[int]]:
        """The question's content words and the chunks holding each (FTS5 matches stems); the last few questions'
        are kept, since a quoted answer asks again for the weights of the question it just retrieved."""
        if question in self._recent:
            return self._recent[question]
        holders: dict[str, set[int]] = {}
        for w in question_words(question):
            holders[w] = self._match(w)
        for phrase in question_phrases(question):  # a term of two words counts where a document holds it so
            found = self._match(phrase)
            if found:
                holders[phrase] = found
        if len(self._recent) >= RECENT_QUESTIONS:
            self._recent.pop(next(iter(self._recent)))
        self._recent[question] = holders
        return holders

    def _match(self, term: str) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ?",
                                                 (_quote(term),))}

    def _idf(self, holders: dict[str, set[int]]) -> dict[str, float]:
        total = self.size or 1
        return {w: math.log((total - len(h) + 0.5) / (len(h) + 0.5) + 1) for w, h in holders.items()}

    def _by_words(self, question: str, limit: int) -> list[Passage]:
        holders = self._holders(question)
        if not holders:
            return []
        idf = self._idf(holders)
        # Coverage counts single words only: a phrase ranks passages, it does not make a question covered.
        single = {w: h for w, h in holders.items() if " " not in w}
        weight = sum(idf[w] for w in single) or 1.0
        query = " OR ".join(_quote(w) for w in holders)
        rows = self._conn.execute(
            "SELECT f.rowid, bm25(chunks_fts) AS s, d.name, c.location, c.text, c.row_id FROM chunks_fts f "
            "JOIN chunks c ON c.id = f.rowid JOIN documents d ON d.id = c.document "
            "WHERE chunks_fts MATCH ? ORDER BY s, f.rowid LIMIT ?", (query, CANDIDATES)).fetchall()
        out = []
        for chunk_id, score, name, location, text, row_id in rows:
            cover = sum(idf[w] for w, h in single.items() if chunk_id in h) / weight
            out.append(Passage(name, location, text, round(float(score), 4), round(cover, 4), "words", row_id))
        out.sort(key=lambda p: (p.coverage < self.min_coverage, p.score))
        return out[:limit]


def _quote(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'


# -- answers -------------------------------------------------------------------------------------------------------

def sources_of(passages: Sequence[Passage], quoted: str = "") -> tuple[SourceRef, ...]:
    """The citations of an answer: built from the retrieved passages, never from the model's text.

    An excerpt leaves out a section's heading path (the location names it); the first passage's excerpt starts at
    ``quoted`` (the answer taken from it) when that is further in than the excerpt reaches.
    """
    out: list[SourceRef] = []
    for n, p in enumerate(passages):
        text = p.text.split("\n", 1)[-1] if p.location.startswith("section ") else p.text
        excerpt = " ".join(text.split())
        start = excerpt.find(" ".join(quoted.split()[:8])) if n == 0 and quoted else -1
        if start > EXCERPT_CHARS // 2:
            excerpt = "…" + excerpt[start:]
        if len(excerpt) > EXCERPT_CHARS:
            excerpt = excerpt[: EXCERPT_CHARS - 1].rsplit(" ", 1)[0] + "…"
        out.append(SourceRef(p.document, p.location, excerpt))
    return tuple(out)


def answer_from_row(passages: Sequence[Passage]) -> str | None:
    """The text of the table row a question named by its identifier, or None when no row was named."""
    if not passages or passages[0].matched != "identifier":
        return None
    return row_text(passages[0])


def row_text(passage: Passage) -> str | None:
    """A table row in its own words, in its column order: ``code: A412 / message: Spindle overtemperature /
    cause: ...`` becomes ``A412 — Spindle overtemperature. Cause: ... Action: ...``."""
    fields = [line.split(": ", 1) for line in passage.text.splitlines() if ": " in line]
    if not fields:
        return None
    ident = next((v for _k, v in fields if passage.row_id and normalize_id(v) == passage.row_id), "")
    rest = [(k, v) for k, v in fields if v != ident]
    if not rest:
        return ident or None
    head, *tail = rest
    sentences = [f"{ident} — {_sentence(head[1])}" if ident else f"{head[0].capitalize()}: {_sentence(head[1])}"]
    sentences += [f"{k.replace('_', ' ').capitalize()}: {_sentence(v)}" for k, v in tail]
    return " ".join(sentences)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


# -- answers in the documents' own words ---------------------------------------------------------------------------

ABBREVIATIONS = frozenset(["no", "nr", "e.g", "i.e", "approx", "fig", "ca", "max", "min", "vs", "etc", "incl", "ref"])
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
SUFFIXES = ("ies", "es", "s", "ing", "ed", "ly")
QUOTE_CHARS = 600
"""At most this much of the documents' text makes a quoted answer."""


def stem(word: str) -> str:
    """A light stem, enough to match ``checked``/``check``, ``litres``/``litre`` and ``changing``/``change``
    between question and text."""
    w = word.lower()
    for suffix in SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)] + ("y" if suffix == "ies" else "")
            break
    return w[:-1] if w.endswith("e") and len(w) >= 5 else w


@dataclass(frozen=True)
class Sentence:
    """A sentence of a passage, with the heading it stands under."""

    text: str
    """The sentence as the document writes it (its line breaks joined)."""
    heading: str
    """The heading path or page title above it ("" when none)."""
    passage: int
    """Index of its passage among the retrieved ones (0 is the best)."""
    position: int
    """Its place in the passage."""
    opens_list: bool = False
    """It ends with a colon: it introduces what follows it (steps, checks)."""
    whole: str = ""
    """For a field of a table row: the whole row, which is the answer when this field is the best match."""


def sentences_of(passage: Passage, index: int = 0) -> list[Sentence]:
    """``passage`` cut into sentences: wrapped lines joined, list items kept apart, a heading line (a Markdown
    heading path, a PDF page title) kept as the sentences' heading instead of as a sentence."""
    if passage.location.startswith("row "):  # each field is judged alone; the answer is the whole row
        row = row_text(passage) or ""
        fields = [line for line in passage.text.splitlines() if ": " in line]
        return [Sentence(f, "", index, n, whole=row) for n, f in enumerate(fields)]
    lines = [line.strip() for line in passage.text.splitlines()]
    heading = ""
    if lines and (passage.location.startswith("section ") or (_is_title(lines[0]) and len(lines) > 1)):
        heading, lines = lines[0], lines[1:]
    logical: list[str] = []  # lines joined where the document only wrapped them
    for line in lines:
        if not line:
            logical.append("")
            continue
        prev = logical[-1] if logical else ""
        # A line wraps on when the one before ends mid-sentence, unless that one is a title and this one starts a
        # new sentence; a list item never continues the line before it.
        if (prev and not LIST_ITEM.match(line) and not prev.endswith((".", "!", "?", ":"))
                and (line[0].islower() or not _is_title(prev))):
            logical[-1] += " " + line
        else:
            logical.append(line)
    out: list[Sentence] = []
    for line in (x for x in logical if x):
        if _is_title(line) and not LIST_ITEM.match(line):
            heading = line.rstrip(":")
            continue
        pieces: list[str] = []
        for piece in SENTENCE_BREAK.split(line):
            last = pieces[-1].rsplit(None, 1)[-1].rstrip(".").lower() if pieces else ""
            if pieces and (last in ABBREVIATIONS or re.fullmatch(r"\d+[.)]", pieces[-1])):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        for piece in pieces:
            out.append(Sentence(piece, heading, index, len(out), piece.endswith(":")))
    return out


def _is_title(line: str) -> bool:
    """A short line that does not end a sentence: a page title, a table caption."""
    return not line.endswith((".", "!", "?", ":", ";", ",")) and len(line.split()) <= 8


# What kind of answer a question asks for, first match wins: a quantity, how often, or the steps of a procedure.
ANSWER_KINDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bhow often\b|\bwhen (?:do|does|should|must|is|are)\b.*\b(?:check|change|clean|replace|"
                r"top|drain|service|inspect)", re.I), "frequency"),
    (re.compile(r"\bhow (?:many|much|long|big|heavy|high|hot|far|large|deep|wide)\b|\bwhat (?:is the )?"
                r"(?:pressure|temperature|size|weight|length|diameter|voltage|speed|force|torque|capacity|"
                r"concentration|level|number|limit|maximum|minimum)\b", re.I), "quantity"),
    (re.compile(r"\bhow (?:do|can|should|must|would) (?:i|we|you)\b|\bhow to\b|\b(?:steps|procedure)\b", re.I),
     "procedure"),
)
QUANTITY = re.compile(r"(?<![\w.-])\d+(?:[.,]\d+)?(?![\w-])|\b(?:one|two|three|four|five|six|seven|eight|nine|"
                      r"ten|twelve|twenty|hundred)\b", re.I)
FREQUENCY = re.compile(r"\bevery\b|\beach (?:shift|day|week|month|year)\b|\b(?:daily|weekly|monthly|yearly|"
                       r"annually|hourly)\b|\bstart of (?:every|each|the) shift\b|\bper (?:shift|day|week)\b",
                       re.I)
KIND_BONUS = 0.25
"""What a sentence of the kind the question asks for (a number for "how many") adds to its score."""


def _terms(text: str) -> set[str]:
    """The stems of ``text`` and its adjacent stem pairs (to match the question's words and phrases)."""
    stems = [stem(m.group(0)) for m in WORD.finditer(text)]
    return {*stems, *(f"{a} {b}" for a, b in itertools.pairwise(stems))}


def answer_kind(question: str) -> str:
    """``frequency``, ``quantity``, ``procedure``, or ``""``: what kind of answer ``question`` asks for."""
    return next((kind for pattern, kind in ANSWER_KINDS if pattern.search(question)), "")


def _of_kind(s: Sentence, kind: str) -> bool:
    if kind == "frequency":
        return bool(FREQUENCY.search(s.text))
    if kind == "quantity":
        return bool(QUANTITY.search(s.text))
    if kind == "procedure":  # a step, or the sentence that opens the steps
        return s.opens_list or bool(LIST_ITEM.match(s.text))
    return False


def quote_answer(question: str, passages: Sequence[Passage], weights: dict[str, float],
                 ) -> tuple[str, Passage] | None:
    """The sentences of the passages that answer ``question``, in the documents' own words, and their passage.

    Each sentence is scored by the question's words it holds, weighted by their rarity (a word only in its
    heading counts half), plus ``KIND_BONUS`` when it holds the kind of answer asked for (a number for "how
    many", an interval for "how often"). The best one is the answer, with the list after it when it opens one or
    the question asks how to do something, else with the next sentence when that one scores at least half as
    well on the question's words.
    None when no sentence holds any of the question's words.
    """
    wanted = {" ".join(stem(x) for x in w.split()): v for w, v in weights.items()}
    total = sum(wanted.values())
    if not wanted or total <= 0:
        return None
    kind = answer_kind(question)

    # A heading names what its sentences are about: half a word's weight, all of it for the steps under it.
    def words_score(s: Sentence) -> float:
        held, above = _terms(s.text), _terms(s.heading)
        share = 1.0 if kind == "procedure" and LIST_ITEM.match(s.text) else 0.5
        return (sum(v for w, v in wanted.items() if w in held) +
                share * sum(v for w, v in wanted.items() if w in above and w not in held)) / total

    best: tuple[float, bool, int, int, int] | None = None
    chosen: list[Sentence] = []
    every: list[list[Sentence]] = [sentences_of(p, i) for i, p in enumerate(passages)]
    for group in every:
        for s in group:
            score = words_score(s)
            if score > 0 and _of_kind(s, kind):
                score += KIND_BONUS
            # On a tie, a manual's sentence before a table row (a question naming no row asks about the prose),
            # then the shorter sentence (it says the same more directly).
            key = (round(score, 6), not s.whole, -len(s.text), -s.passage, -s.position)
            if score > 0 and (best is None or key > best):
                best, chosen = key, [s]
    if best is None:
        return None
    first = chosen[0]
    if first.whole:
        return first.whole, passages[first.passage]
    group = every[first.passage]
    after = group[first.position + 1:]
    steps = []
    for s in after:
        if not LIST_ITEM.match(s.text):
            break
        steps.append(s)
    if steps and (first.opens_list or kind == "procedure"):
        chosen += steps[:8]
    elif first.opens_list and after:
        chosen.append(after[0])
    elif after:  # the next sentence when it says about as much of the question
        nxt = after[0]
        if words_score(nxt) >= 0.5 * words_score(first) and len(first.text) + len(nxt.text) < QUOTE_CHARS:
            chosen.append(nxt)
    # Steps keep a line each, as the document sets them out; sentences run on.
    text = "".join(("\n" if LIST_ITEM.match(s.text) else " ") + s.text for s in chosen).strip()
    if len(text) > QUOTE_CHARS:
        text = text[: QUOTE_CHARS - 1].rsplit(" ", 1)[0] + "…"
    return text, passages[first.passage]

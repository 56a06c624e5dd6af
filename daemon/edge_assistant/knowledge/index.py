"""The index of the plant's documents: one SQLite file in the state directory, brought up to date incrementally.

    documents (path, name, sha256, kind, pages, chunks)        one row per file, its content hash
    chunks (document, ord, location, text, row_id)             a Markdown section, a text block, a PDF page, a CSV row
    chunks_fts (text)                                          FTS5, Porter stemming; rowid = chunk id
    identifiers (ident, chunk, primary_row)                    alarm codes, part numbers, switch names, normalised

Indexing runs in one transaction: a kill in the middle leaves the previous index as it was. Files whose content
hash is unchanged are not read again. A file that cannot be read is named in one log line and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import KnowledgeConfig
from ..errors import KnowledgeError
from .identifiers import identifiers_in
from .readers import KINDS, Parsed, UnreadableError, find_documents, read_document

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
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


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
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
    conn = connect(cfg.index_path())
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
        report.digest = digest_of(conn)
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


def digest_of(conn: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for name, sha in conn.execute("SELECT name, sha256 FROM documents ORDER BY name, sha256"):
        h.update(f"{name}\0{sha}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class DocumentInfo:
    """One indexed document, for ``knowledge list``."""

    name: str
    path: str
    kind: str
    pages: int
    chunks: int
    sha256: str

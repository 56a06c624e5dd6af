"""The index of the plant's documents: one SQLite file in the state directory, brought up to date incrementally.

    documents (path, name, sha256, kind, pages, chunks)        one row per file, its content hash
    chunks (document, ord, location, kind, text, row_id)       a Markdown section, a text block, a PDF page, a row
    chunks_fts (text), chunks_vocab                            FTS5, Porter stemming; rowid = chunk id; its terms
    identifiers (ident, chunk, primary_row)                    alarm codes, part numbers, switch names, normalised
    units (chunk, ord, vector)                                 a sentence-embedding vector (float16) per unit
                                                               (``units.units_of``) of each chunk

The vectors come from the sentence-embedding model named in ``meta`` (``embedder``); another model, or none
before, has every chunk embedded again. Otherwise only the chunks of new and changed files are embedded.

Indexing runs in one transaction: a kill in the middle leaves the previous index as it was. Files whose content
hash is unchanged are not read again. A file that cannot be read is named in one log line and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..config import KnowledgeConfig
from ..errors import KnowledgeError
from ..messages import Passage
from .identifiers import identifiers_in
from .readers import KINDS, Parsed, UnreadableError, find_documents, read_document
from .units import units_of

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
"""An index of another version is built again from the documents (it holds nothing else)."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, name TEXT NOT NULL, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
  pages INTEGER NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY, document INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL,
  location TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL, row_id TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, tokenize='porter unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS identifiers (ident TEXT NOT NULL, chunk INTEGER NOT NULL, primary_row INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS identifiers_ident ON identifiers(ident);
CREATE INDEX IF NOT EXISTS identifiers_chunk ON identifiers(chunk);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
CREATE TABLE IF NOT EXISTS units (chunk INTEGER NOT NULL, ord INTEGER NOT NULL, vector BLOB NOT NULL,
  PRIMARY KEY (chunk, ord));
"""
TABLES = ("meta", "documents", "chunks", "chunks_fts", "chunks_vocab", "identifiers", "units")


class Embedder(Protocol):
    """Unit-length sentence embeddings (``engine.LlamaEmbedder``)."""

    def embed(self, texts: Sequence[str], remember: bool = False) -> npt.NDArray[np.float32]: ...


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
    embedded: int = 0
    """Units embedded in this run."""
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
            _drop_other_versions(conn)
            conn.executescript(SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        raise KnowledgeError(f"{path}: cannot open the knowledge index: {exc}") from exc
    return conn


def _drop_other_versions(conn: sqlite3.Connection) -> None:
    """An index of another schema version is dropped whole: it holds nothing the documents cannot give again."""
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if has_meta else None
    if has_meta and (version is None or version[0] != SCHEMA_VERSION):
        log.info("knowledge: the index is of another version; it is built again")
        for table in reversed(TABLES):
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def build_index(cfg: KnowledgeConfig, embedder: Embedder | None = None) -> IndexReport:
    """Bring the index up to date with the documents, in one transaction; unchanged files are not read.

    With an ``embedder`` every unit of a new or changed chunk is embedded; without one the index has no vectors and
    retrieval goes by words alone.
    """
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
        report.embedded = _embed_missing(conn, embedder)
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
    log.info("knowledge: %d added, %d updated, %d removed, %d unchanged, %d skipped; %d chunks, %d units embedded "
             "(%.2f s)", len(report.added), len(report.updated), len(report.removed), report.unchanged,
             len(report.skipped), report.chunks, report.embedded, report.seconds)
    return report


def _delete(conn: sqlite3.Connection, doc_id: int) -> None:
    ids = [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document = ?", (doc_id,))]
    conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
    conn.executemany("DELETE FROM identifiers WHERE chunk = ?", [(i,) for i in ids])
    conn.executemany("DELETE FROM units WHERE chunk = ?", [(i,) for i in ids])
    conn.execute("DELETE FROM chunks WHERE document = ?", (doc_id,))
    conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))


def _insert(conn: sqlite3.Connection, path: str, name: str, sha: str, kind: str, parsed: Parsed) -> None:
    cur = conn.execute("INSERT INTO documents (path, name, sha256, kind, pages, chunks) VALUES (?, ?, ?, ?, ?, ?)",
                       (path, name, sha, kind, parsed.pages, len(parsed.chunks)))
    doc_id = cur.lastrowid
    for order, chunk in enumerate(parsed.chunks):
        cur = conn.execute("INSERT INTO chunks (document, ord, location, kind, text, row_id) VALUES (?, ?, ?, ?, ?, ?)",
                           (doc_id, order, chunk.location, chunk.kind, chunk.text, chunk.row_id))
        chunk_id = cur.lastrowid
        conn.execute("INSERT INTO chunks_fts (rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
        idents = {(i, 0) for i in identifiers_in(chunk.text)}
        if chunk.row_id:
            idents.discard((chunk.row_id, 0))
            idents.add((chunk.row_id, 1))
        conn.executemany("INSERT INTO identifiers (ident, chunk, primary_row) VALUES (?, ?, ?)",
                         [(i, chunk_id, p) for i, p in sorted(idents)])


IDENTITY_PROBE = "The quick brown fox jumps over the lazy dog."
"""Embedded to know the embedder: another model (or the same on other kernels) gives another vector."""


def embedder_identity(embedder: Embedder) -> str:
    """What names an embedder's vectors: the digest of its vector for ``IDENTITY_PROBE``."""
    vector = np.asarray(embedder.embed([IDENTITY_PROBE])[0], dtype=np.float16)
    return hashlib.sha256(vector.tobytes()).hexdigest()


def _embed_missing(conn: sqlite3.Connection, embedder: Embedder | None) -> int:
    """Embed the units of every chunk that has no vectors from this embedder; the number embedded."""
    if embedder is None:
        conn.execute("DELETE FROM units")
        conn.execute("DELETE FROM meta WHERE key = 'embedder'")
        return 0
    embedder_id = embedder_identity(embedder)
    row = conn.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
    if row is None or row[0] != embedder_id:
        conn.execute("DELETE FROM units")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (embedder_id,))
    rows = conn.execute(
        "SELECT c.id, d.name, c.location, c.kind, c.text, c.row_id FROM chunks c JOIN documents d ON d.id = c.document "
        "WHERE NOT EXISTS (SELECT 1 FROM units u WHERE u.chunk = c.id) ORDER BY c.id").fetchall()
    done: dict[str, bytes] = {}  # a text met again (a repeated heading) is embedded once
    count = 0
    for chunk_id, name, location, kind, text, row_id in rows:
        units = units_of(Passage(name, location, text, 0.0, 0.0, kind=kind, row_id=row_id))
        todo = [u.embedded for u in units if u.embedded not in done]
        if todo:
            for t, vec in zip(todo, embedder.embed(todo), strict=True):
                done[t] = np.asarray(vec, dtype=np.float16).tobytes()
            count += len(todo)
        conn.executemany("INSERT INTO units (chunk, ord, vector) VALUES (?, ?, ?)",
                         [(chunk_id, u.position, done[u.embedded]) for u in units])
    return count


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

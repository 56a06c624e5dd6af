"""Passages for a question: identifiers exactly, then words ranked by BM25 with their coverage of the question."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..config import KnowledgeConfig
from ..errors import KnowledgeError
from ..messages import Passage
from .identifiers import identifiers_in, question_phrases, question_words
from .index import DocumentInfo, connect, digest_of

CANDIDATES = 24

RECENT_QUESTIONS = 8
"""Questions whose word lookups a retriever keeps (concurrent requests each retrieve, then weigh)."""


class Retriever:
    """Reads an index built by ``build_index``. Thread-safe (one connection under a lock)."""

    def __init__(self, path: Path, min_coverage: float = 0.5) -> None:
        if not path.is_file():
            raise KnowledgeError(f"{path}: no knowledge index (run `edge-assistant knowledge index`)")
        self.path = path
        self.min_coverage = min_coverage
        self._conn = connect(path, readonly=True)
        self._lock = threading.Lock()
        self._recent: dict[str, dict[str, set[int]]] = {}  # question -> its words' chunks: retrieval, then weights
        with self._lock:
            self.digest = digest_of(self._conn)
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

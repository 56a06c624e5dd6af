"""Passages for a question: identifiers exactly; otherwise words (BM25) and meaning (sentence vectors), fused.

- A question naming an identifier (an alarm code, a part number) gets the passages holding it, its table row first.
  A question naming an identifier that no document holds is not covered, whatever its words.
- Any other question is ranked twice: by BM25 over the chunks' words (FTS5, Porter stems) and by the cosine
  similarity of its sentence vector to each chunk's closest unit (``units.units_of``: a title, a sentence, a step,
  a row). The two rankings are fused by reciprocal rank fusion (score = sum of 1 / (60 + rank)), which needs no
  scale shared by the two scores. Operators rarely use the documents' words ("the water in the tank" for
  "condensate in the air receiver"): meaning finds what words miss, and words find what meaning blurs (a part
  number, a rare term).

Whether the best passage answers the question is decided in ``answer``, from what is found here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..config import KnowledgeConfig
from ..errors import KnowledgeError
from ..messages import Passage
from ..text import content_words, stem
from .identifiers import designations, identifiers_in, numbered_rank, spaced_identifiers
from .index import DocumentInfo, Embedder, connect, digest_of
from .readers import PART

CANDIDATES = 24
"""Chunks taken from each ranking before they are fused."""
RRF_K = 60
"""Reciprocal rank fusion's constant, as its authors set it (Cormack, Clarke and Büttcher, 2009)."""


@dataclass(frozen=True)
class Found:
    """What retrieval found for a question: the passages and what the answer choice needs to judge them."""

    passages: tuple[Passage, ...]
    """Best first."""
    similarities: tuple[tuple[float, ...], ...]
    """For each passage, the question's cosine similarity to each of its units (empty without vectors)."""
    weights: dict[str, float]
    """The question's content words (Porter stems) with their rarity in the documents (BM25's inverse document
    frequency; a word no document holds has the highest)."""
    known: frozenset[str]
    """Those of the question's stems that some document holds."""
    by_identifier: bool = False
    """The passages hold an identifier the question names."""
    unknown_identifier: bool = False
    """The question names an identifier that no document holds: the documents do not cover it."""
    designations: dict[str, frozenset[str]] = field(default_factory=dict)
    """The numbered things the question names (``identifiers.designations``: ``compressor 2``)."""


class Retriever:
    """Reads an index built by ``build_index``. Thread-safe: one connection under a lock; the vectors are read-only
    after opening. With an ``embedder`` (the one the index was built with) questions are also ranked by meaning."""

    def __init__(self, path: Path, embedder: Embedder | None = None, min_coverage: float = 0.5) -> None:
        if not path.is_file():
            raise KnowledgeError(f"{path}: no knowledge index (run `edge-assistant knowledge index`)")
        self.path = path
        self.min_coverage = min_coverage
        self._conn = connect(path, readonly=True)
        self._lock = threading.Lock()
        self._embedder = embedder
        with self._lock:
            self.digest = digest_of(self._conn)
            self.size = int(self._conn.execute("SELECT count(*) FROM chunks").fetchone()[0])
            rows = self._conn.execute("SELECT chunk, ord, vector FROM units ORDER BY chunk, ord").fetchall()
        self._unit_chunk = np.array([r[0] for r in rows], dtype=np.int64)
        self._unit_ord = np.array([r[1] for r in rows], dtype=np.int64)
        self._vectors: npt.NDArray[np.float32] = (
            np.stack([np.frombuffer(r[2], dtype=np.float16) for r in rows]).astype(np.float32) if rows
            else np.zeros((0, 0), dtype=np.float32))
        # Where each chunk's units start in the (chunk-sorted) matrix, for the per-chunk maximum.
        self._chunk_ids, self._starts = np.unique(self._unit_chunk, return_index=True)

    @property
    def dense(self) -> bool:
        """Whether questions are ranked by meaning too (an embedder and an index with vectors)."""
        return self._embedder is not None and len(self._vectors) > 0

    @property
    def vectors(self) -> npt.NDArray[np.float32]:
        """The sentence vectors of the indexed units (titles, sentences, steps, rows), one row each (none without
        vectors): what the documents talk about, on-topic evidence for the guard's relevance classifier."""
        return self._vectors

    @classmethod
    def open(cls, cfg: KnowledgeConfig, embedder: Embedder | None = None) -> Retriever:
        """The retriever of the configured index."""
        return cls(cfg.index_path(), embedder, cfg.min_coverage)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    def documents(self) -> list[DocumentInfo]:
        """The indexed documents."""
        with self._lock:
            rows = self._conn.execute("SELECT name, path, kind, pages, chunks, sha256 FROM documents ORDER BY name")
            return [DocumentInfo(*r) for r in rows]

    def find(self, question: str, limit: int = 3, strict_ids: bool = True) -> Found:
        """The passages for ``question``, best first, with what judging them needs.

        With ``strict_ids`` a question naming identifiers of which the documents know none is not covered; without
        (a PLC alarm's fields, where a tag may be in no document), its words are still searched.
        """
        qvec = self._embed(question)
        with self._lock:
            weights, known = self._weights(question)
            idents = identifiers_in(question)
            spaced = [i for i in spaced_identifiers(question) if self._holds(i)]
            by_id = self._by_identifier([*spaced, *idents]) if spaced or idents else []
            numbered = designations(question)
            if by_id:
                # The identifier's own passages only: a small model does best with few, relevant ones. Those that
                # name a numbered thing as the question does come first (the detector's stage 1 row for a question
                # about stage 1), those that speak only of its siblings last (``identifiers.numbered_rank``).
                by_id.sort(key=lambda p: numbered_rank(numbered, p.text))
                passages, sims = self._whole(by_id[:limit], qvec)
                return Found(passages, sims, weights, known, by_identifier=True, designations=numbered)
            passages, sims = self._whole(self._fused(question, qvec, limit), qvec)
        return Found(passages, sims, weights, known, unknown_identifier=strict_ids and bool(idents),
                     designations=numbered)

    def search(self, question: str, limit: int = 5, strict_ids: bool = True) -> list[Passage]:
        """The best passages with their scores (``knowledge search`` shows them)."""
        return list(self.find(question, limit, strict_ids).passages)

    # -- the parts ------------------------------------------------------------------------------------------------

    def _embed(self, question: str) -> npt.NDArray[np.float32] | None:
        if not self.dense or self._embedder is None:
            return None
        return np.asarray(self._embedder.embed([question])[0], dtype=np.float32)

    def _weights(self, question: str) -> tuple[dict[str, float], frozenset[str]]:
        stems = list(dict.fromkeys(stem(w) for w in content_words(question)))
        if not stems:
            return {}, frozenset()
        marks = ",".join("?" * len(stems))
        query = f"SELECT term, doc FROM chunks_vocab WHERE term IN ({marks})"  # noqa: S608 (only placeholders)
        df = dict(self._conn.execute(query, stems).fetchall())
        total = self.size or 1
        weights = {s: math.log((total - df.get(s, 0) + 0.5) / (df.get(s, 0) + 0.5) + 1) for s in stems}
        return weights, frozenset(s for s in stems if df.get(s, 0) > 0)

    def _holds(self, ident: str) -> bool:
        return self._conn.execute("SELECT 1 FROM identifiers WHERE ident = ? LIMIT 1", (ident,)).fetchone() is not None

    def _by_identifier(self, idents: Sequence[str]) -> list[Passage]:
        out: list[Passage] = []
        seen: set[int] = set()
        for ident in dict.fromkeys(idents):
            rows = self._conn.execute(
                "SELECT c.id, d.name, c.location, c.kind, c.text, i.primary_row, c.row_id FROM identifiers i "
                "JOIN chunks c ON c.id = i.chunk JOIN documents d ON d.id = c.document WHERE i.ident = ? "
                "ORDER BY i.primary_row DESC, d.name, c.ord LIMIT 8", (ident,))
            for chunk_id, name, location, kind, text, primary, row_id in rows:
                if chunk_id in seen:
                    continue
                seen.add(chunk_id)
                out.append(Passage(name, location, text, 0.0, 1.0, "identifier" if primary else "identifier-text",
                                   row_id, kind, chunk=chunk_id))
        out.sort(key=lambda p: p.matched != "identifier")
        return out

    def _fused(self, question: str, qvec: npt.NDArray[np.float32] | None, limit: int) -> list[Passage]:
        words = content_words(question)
        lexical: list[int] = []
        if words:
            query = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
            lexical = [r[0] for r in self._conn.execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts), rowid LIMIT ?",
                (query, CANDIDATES))]
        closest: dict[int, float] = {}
        dense: list[int] = []
        if qvec is not None:
            best = np.maximum.reduceat(self._vectors @ qvec, self._starts)
            order = np.lexsort((self._chunk_ids, -best))[:CANDIDATES]
            dense = [int(self._chunk_ids[i]) for i in order]
            closest = {int(self._chunk_ids[i]): float(best[i]) for i in order}
        fused: dict[int, float] = {}
        for ranking in (lexical, dense):
            for rank, chunk in enumerate(ranking, 1):
                fused[chunk] = fused.get(chunk, 0.0) + 1.0 / (RRF_K + rank)
        top = sorted(fused, key=lambda c: (-fused[c], c))[:limit]
        out = []
        for chunk in top:
            name, location, kind, text, row_id = self._conn.execute(
                "SELECT d.name, c.location, c.kind, c.text, c.row_id FROM chunks c JOIN documents d ON "
                "d.id = c.document WHERE c.id = ?", (chunk,)).fetchone()
            out.append(Passage(name, location, text, round(fused[chunk], 6), 0.0, "words", row_id, kind,
                               round(closest.get(chunk, 0.0), 4), chunk))
        return out

    def _whole(self, passages: Sequence[Passage], qvec: npt.NDArray[np.float32] | None,
               ) -> tuple[tuple[Passage, ...], tuple[tuple[float, ...], ...]]:
        """The passages, each part of a long section joined again with its other parts (a procedure is answered
        whole), and the question's similarity to each of their units."""
        out: list[Passage] = []
        sims: list[tuple[float, ...]] = []
        seen: set[tuple[str, str]] = set()
        for p in passages:
            m = PART.search(p.location)
            if m is None:
                out.append(p)
                sims.append(self._similarities(p.chunk, qvec))
                continue
            base = p.location[: m.start()]
            if (p.document, base) in seen:
                continue
            seen.add((p.document, base))
            rows = self._conn.execute(
                "SELECT c.id, c.location, c.text FROM chunks c JOIN documents d ON d.id = c.document WHERE d.name = ? "
                "AND substr(c.location, 1, ?) = ? ORDER BY c.ord", (p.document, len(base), base)).fetchall()
            parts = [(chunk, text) for chunk, location, text in rows if PART.sub("", location) == base]
            text, joined = "", tuple[float, ...]()
            for n, (chunk, part_text) in enumerate(parts):
                body, part_sims = part_text, self._similarities(chunk, qvec)
                if n and p.kind == "section":  # each part repeats the section's heading path: it is said once
                    body, part_sims = part_text.split("\n", 1)[-1], part_sims[1:]
                text, joined = (f"{text}\n{body}" if text else body), (*joined, *part_sims)
            out.append(replace(p, location=base, text=text))
            sims.append(joined)
        return tuple(out), tuple(sims)

    def _similarities(self, chunk: int, qvec: npt.NDArray[np.float32] | None) -> tuple[float, ...]:
        if qvec is None or not len(self._chunk_ids):
            return ()
        at = int(np.searchsorted(self._chunk_ids, chunk))
        if at >= len(self._chunk_ids) or self._chunk_ids[at] != chunk:
            return ()
        start = int(self._starts[at])
        end = int(self._starts[at + 1]) if at + 1 < len(self._starts) else len(self._vectors)
        return tuple(float(x) for x in self._vectors[start:end] @ qvec)


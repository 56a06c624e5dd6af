"""Answers in the documents' own words, and their citations: built from the retrieved passages, never from the model's
text."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..messages import Passage, SourceRef
from .identifiers import WORD, normalize_id

EXCERPT_CHARS = 300

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

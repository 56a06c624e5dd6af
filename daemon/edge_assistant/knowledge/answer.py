"""Answers in the documents' own words, whether the documents answer at all, and the citations.

The answer is the one unit of the retrieved passages (``units``: a title, a sentence, a step, a table row) that is
closest to the question, by meaning (the cosine of their sentence vectors) together with words (the question's
words it holds, each weighted by its rarity in the documents). A title stands for its section: a question closest to
a procedure's title gets the whole procedure, first step to last, with its warnings. A question closest to one step
(the value it holds) gets that step.

Whether the documents answer at all: the nearest unit always exists, so it is judged against the question.

- ``similarity``: how close in meaning the question and the unit are;
- ``cover``: the share of the question's words (weighted by rarity) that the unit's context holds (its heading, and
  for a title its whole section);
- ``foreign``: the share of the question's words that the documents hold elsewhere but the unit's context does not.
  A question about a thing the documents name (the cooler fan) answered by a sentence about another thing of the
  same kind (the motor mount's torque) shows here: the documents know "cooler" and "fan", this sentence does not
  hold them. A word no document holds (an operator's own word) is not foreign: meaning judges it.

- ``gap``: how much closer the unit is than the closest unit of any other passage. Where the documents hold the
  answer, one place stands out; a question the documents match only in general (its words and kind of thing, not
  the thing) finds several places about as close. (Units of the same passage are not compared: a title and the
  sentences under it are one answer.)
- ``words``: how many content words the question has. A short question's similarity says less than a long one's.

The unit answers when the check's score, a logistic regression over these five measures
(``GATE_BIAS + sum(GATE_WEIGHTS[m] * measure)``, ``words`` taken as ``log(1 + words)``), reaches ``THRESHOLD``. The
weights are learned, not set: ``scripts/eval_knowledge --fit`` trains them on the development parts of the labelled
document sets (right answers against the rest, the classes weighted equally) and chooses the threshold with the
highest share of answerable questions answered right plus share of unanswerable ones refused there; it reports the
same fit with each set left out in turn. The README says how.

Citations are built from the retrieved passages, never from the model's text.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..messages import Passage, SourceRef
from ..text import LIST_ITEM, stem, words
from .identifiers import names_a_sibling, numbered_rank
from .retrieve import Found
from .units import Unit, row_text, section_of, units_of

EXCERPT_CHARS = 300
GATE_WEIGHTS = {"similarity": 5.7509, "cover": 2.3341, "foreign": -1.0643, "gap": 4.8099, "words": 1.1085}
"""The check's weight of each measure (learned by ``scripts/eval_knowledge --fit``; see the module's text)."""
GATE_BIAS = -7.1195
"""The check's constant term (learned with the weights)."""
THRESHOLD = -0.5576
"""The score (log-odds of a right answer) an answer must reach (chosen with the weights)."""
QUOTE_CHARS = 600
"""Prose quoted for a title stops at the last whole sentence within this many characters (a procedure is whole)."""
CHOICE_WORDS = 0.5
"""In choosing among units, what the share of the question's words a unit holds itself adds to its similarity.
Set once, before anything was measured (words count half as much as meaning), and not tuned since; the check's
three constants above are the fitted ones."""


@dataclass(frozen=True)
class Choice:
    """The unit that answers best, with the measures that judge it."""

    text: str
    """The answer, in the documents' own words (a procedure whole, a row in its column order)."""
    passage: int
    """The index of its passage among those found."""
    unit: Unit
    """The unit chosen."""
    similarity: float
    """The question's cosine similarity to it (0 without vectors)."""
    cover: float
    """The share of the question's words its context holds."""
    foreign: float
    """The share of the question's words the documents hold but its context does not."""
    score: float
    """The check's score: ``GATE_BIAS`` plus each measure times its ``GATE_WEIGHTS`` weight."""
    supported: bool
    """Whether the documents answer the question (``score >= THRESHOLD``)."""
    gap: float = 0.0
    """How much closer it is to the question than the closest unit of another passage."""
    words: int = 0
    """How many content words the question has."""


def choose(found: Found, dense: bool, min_coverage: float = 0.5) -> Choice | None:
    """The best answer among the found passages, judged; None when they hold no unit at all.

    Without vectors (``dense`` False) the choice goes by words alone and a unit answers when its context holds
    ``min_coverage`` of the question's words and nothing the documents name elsewhere.
    """
    total = sum(found.weights.values())
    if total <= 0 or not found.passages:
        return None
    ranked: list[tuple[tuple[float, int, int], int, Unit, list[Unit], tuple[float, ...]]] = []
    for i, passage in enumerate(found.passages):
        units = units_of(passage)
        sims = found.similarities[i] if i < len(found.similarities) else ()
        ranked.extend(((round(_closeness(found, sims, unit, total), 6), -i, -unit.position), i, unit, units, sims)
                      for unit in units)
    if not ranked:
        return None
    ranked.sort(key=lambda r: r[0], reverse=True)
    # The closest unit that does not speak of a sibling of the numbered thing asked for (compressor 1's alarm for a
    # question about compressor 2); when every one does, the closest, judged unsupported.
    answers = ((r, *_answer(r[2], r[3], _closer(found, r[4], total))) for r in ranked)
    first = next(answers)
    (key, i, unit, units, sims), text, context = next(
        (a for a in itertools.chain([first], answers) if not names_a_sibling(found.designations, a[2])), first)
    gap = key[0] - next((r[0][0] for r in ranked if r[1] != i), 0.0)
    # A row named by its identifier is the answer (``answer_from_row``): the first passage, judged the same way.
    sibling = names_a_sibling(found.designations, found.passages[0].text if found.by_identifier else context)
    similarity = sims[unit.position] if unit.position < len(sims) else 0.0
    held = _stems(context)
    cover = _share(found.weights, held) / total
    foreign = _share({s: w for s, w in found.weights.items() if s in found.known}, set(found.weights) - held) / total
    measures = {"similarity": similarity, "cover": cover, "foreign": foreign, "gap": gap,
                "words": math.log1p(len(found.weights))}
    score = GATE_BIAS + sum(GATE_WEIGHTS[m] * v for m, v in measures.items())
    if sibling or found.unknown_identifier:
        supported = False
    elif found.by_identifier:
        supported = True
    elif dense:
        supported = score >= THRESHOLD
    else:
        supported = cover >= min_coverage and foreign == 0
    return Choice(text, i, unit, round(similarity, 4), round(cover, 4), round(foreign, 4), round(score, 4),
                  supported, round(gap, 4), len(found.weights))


def _answer(unit: Unit, units: list[Unit], closeness: Callable[[Unit], float]) -> tuple[str, str]:
    """The answer a unit stands for, and the text that judges it (with the heading above it).

    - A title stands for its section: a procedure (a section holding steps) whole; prose up to ``QUOTE_CHARS``,
      whole sentences.
    - A sentence followed by a list introduces it (``... must be locked out.`` then the steps): it comes with the
      whole list.
    - A step or a row alone: each item of a list is one instruction, each row one entry.
    - A sentence with the sentence after it under the same heading when that one is at least half as close to the
      question (``closeness``): the point of a sentence often runs on into the next ("... are grease-packed for
      life. Do not add grease.").
    """
    if unit.kind == "title":
        body = section_of(units, unit)
        if not any(u.kind == "step" for u in body):
            body = _within(body, QUOTE_CHARS)
        return (_join(body) if body else unit.text), " ".join([unit.text, *(u.text for u in body)])
    after = units[unit.position + 1:]
    steps = list(itertools.takewhile(lambda u: u.kind == "step", after))
    if unit.kind == "sentence" and steps:
        text = _join([unit, *steps])
        return text, f"{unit.heading} {text}"
    chosen = [unit]
    nxt = after[0] if after else None
    if (nxt is not None and unit.kind == "sentence" and nxt.kind == unit.kind and nxt.heading == unit.heading
            and closeness(nxt) >= 0.5 * closeness(unit) and len(unit.text) + len(nxt.text) <= QUOTE_CHARS):
        chosen.append(nxt)
    text = _join(chosen)
    return text, f"{unit.heading} {text}"


def _within(units: list[Unit], limit: int) -> list[Unit]:
    """The first units whose text fits in ``limit`` characters (at least one)."""
    out: list[Unit] = []
    size = 0
    for u in units:
        size += len(u.text) + 1
        if out and size > limit:
            break
        out.append(u)
    return out


def _join(units: Sequence[Unit]) -> str:
    """Units as the document sets them out: steps a line each, sentences run on."""
    return "".join(("\n" if LIST_ITEM.match(u.text) else " ") + u.text for u in units).strip()


def _closeness(found: Found, sims: tuple[float, ...], unit: Unit, total: float) -> float:
    """How close a unit is to the question: its similarity, and ``CHOICE_WORDS`` times the share of the question's
    words it holds itself, and as much again times the share of the numbered things the question names that it
    names as asked (``stage 1``: a one-digit number is no word of its own)."""
    similarity = sims[unit.position] if unit.position < len(sims) else 0.0
    asked = len(found.designations)
    numbered = -min(0, numbered_rank(found.designations, unit.text)) / asked if asked else 0.0
    return similarity + CHOICE_WORDS * (_share(found.weights, _stems(unit.text)) / total + numbered)


def _closer(found: Found, sims: tuple[float, ...], total: float) -> Callable[[Unit], float]:
    return lambda u: _closeness(found, sims, u, total)


def _stems(text: str) -> set[str]:
    return {stem(w) for w in words(text)}


def _share(weights: dict[str, float], held: set[str]) -> float:
    return sum(w for s, w in weights.items() if s in held)


def answer_from_row(passages: Sequence[Passage]) -> str | None:
    """The text of the table row a question named by its identifier, or None when no row was named."""
    if not passages or passages[0].matched != "identifier":
        return None
    return row_text(passages[0]) or None


def sources_of(passages: Sequence[Passage], quoted: str = "") -> tuple[SourceRef, ...]:
    """The citations of an answer: built from the retrieved passages, never from the model's text.

    An excerpt leaves out a section's heading path (the location names it); the first passage's excerpt starts at
    ``quoted`` (the answer taken from it) when that is further in than the excerpt reaches.
    """
    out: list[SourceRef] = []
    for n, p in enumerate(passages):
        text = p.text.split("\n", 1)[-1] if p.kind == "section" else p.text
        excerpt = " ".join(text.split())
        start = excerpt.find(" ".join(quoted.split()[:8])) if n == 0 and quoted else -1
        if start > EXCERPT_CHARS // 2:
            excerpt = "…" + excerpt[start:]
        if len(excerpt) > EXCERPT_CHARS:
            excerpt = excerpt[: EXCERPT_CHARS - 1].rsplit(" ", 1)[0] + "…"
        out.append(SourceRef(p.document, p.location, excerpt))
    return tuple(out)

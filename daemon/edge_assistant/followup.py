"""What a question in a conversation is retrieved with: its own words, or its words and the last turn's subject.

Operators ask in turns: "What does alarm 2014 mean?", then "How do I clear it?". The second question names no
subject of its own; alone it finds nothing, or the wrong thing. So a question in a conversation is retrieved twice,
deterministically, and the two results are compared by the answer check of ``knowledge.answer``:

- alone, as it would be outside a conversation;
- carried: its words followed by the last answered turn's subject (``subject_words``): the identifiers it was about
  (an alarm code), its subject terms (words of its question the documents know), and the heading of the section it
  was answered from (its source).

The question **names its own subject**, and is retrieved alone, when it names an identifier (an alarm code, a part
number: known to the documents or not), or when alone it finds a supported answer that scores at least as high as
the carried one. Otherwise it **continues the last turn's subject** when the carried query finds a supported answer:
"How do I clear it?" alone finds nothing the check supports; with ``2014 alarm coolant level low`` it finds alarm
2014's row. A question the documents answer neither way stays alone: they do not cover it.

Whether a question **refers back** (``refers_back``) is a property of its words: it holds a pronoun or demonstrative
that stands for something said before (``it``, ``that``, ``them``, ... from the Snowball stop-word list), or no word
of its own at all ("And how often?"). A carried identifier finds that identifier's row whatever the question asks,
and the row is supported for a question that names the identifier. So a follow-up that refers back may take the
row as its answer ("Why does that happen?"), but one that does not ("Who won the football last night?") takes a
carried answer only when the answer passes the check on its own score (``supported_on_merit``). The topic check
uses the same property (``pipeline``): a question that refers back is judged together with the question before it,
any other alone.

``Plan.why`` says which it was, with both scores; ``knowledge search --conversation`` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .conversations import MAX_ITEMS, Turn
from .knowledge import Choice, Found, identifiers_in, normalize_id
from .knowledge.answer import THRESHOLD
from .messages import Passage
from .text import STOPWORDS, content_words, stem, words

Look = Callable[[str], tuple[Found, Choice | None]]
"""Retrieve a query and choose its answer: ``Retriever.find`` then ``knowledge.choose``."""

MAX_CARRIED = 8
"""Words of the last turn's subject added to a follow-up, at most."""
NUMBER = re.compile(r"^[\d.,]+$")


@dataclass(frozen=True)
class Plan:
    """How a question was retrieved, and why."""

    query: str
    """The text retrieved: the question, or the question and the carried words."""
    found: Found
    """What it found."""
    choice: Choice | None
    """The answer chosen from it (judged)."""
    carried: tuple[str, ...] = ()
    """The words of the last turn's subject added; empty when the question names its own subject."""
    why: str = ""
    """Why, in a sentence, with the scores compared."""
    alone_score: float | None = None
    """The answer check's score of the question alone (None: nothing found)."""
    carried_score: float | None = None
    """The same with the last turn's subject (None: not tried, or nothing found)."""

    @property
    def covered(self) -> bool:
        """Whether the documents answer it."""
        return self.choice is not None and self.choice.supported


REFERRING = frozenset({"it", "its", "itself", "they", "them", "their", "theirs", "themselves", "this", "that",
                       "these", "those"})
"""Third-person pronouns and demonstratives of the Snowball stop-word list: words that stand for something said
before."""


def refers_back(question: str) -> bool:
    """Whether ``question`` leans on what was said before: it holds a word of ``REFERRING``, or no content word of
    its own ("Why?", "And how often?")."""
    return bool(REFERRING.intersection(words(question))) or not content_words(question)


def supported_on_merit(choice: Choice | None, dense: bool, min_coverage: float) -> bool:
    """Whether an answer passes the check by its own measures, as the check judges a question that names no
    identifier: an identifier's row is not supported for being the carried identifier's row."""
    if choice is None:
        return False
    if dense:
        return choice.score >= THRESHOLD
    return choice.cover >= min_coverage and choice.foreign == 0


def subject_words(turn: Turn) -> list[str]:
    """The words that say what ``turn`` was about: its identifiers, then its subject terms; no repeats (by stem), at
    most ``MAX_CARRIED``."""
    out: list[str] = []
    seen: set[str] = set()
    for word in (*turn.identifiers, *turn.terms):
        key = stem(word.lower())
        if key not in seen:
            seen.add(key)
            out.append(word)
    return out[:MAX_CARRIED]


def title_of(passage: Passage) -> str:
    """What names a passage: a section's own heading (the last of its location: ``4.1 Changing the coolant``); a
    table row's first field after its identifier (``COOLANT LEVEL LOW``: the column that names the entry)."""
    if passage.kind == "section" or passage.location.startswith("section "):
        return passage.location.removeprefix("section ").rsplit(">", 1)[-1].strip()
    if passage.kind == "row":
        for line in passage.text.splitlines():
            _key, _, value = line.partition(": ")
            if value and not (passage.row_id and normalize_id(value) == normalize_id(passage.row_id)):
                return value
    return ""


def plan(question: str, previous: Turn | None, look: Look, dense: bool = True, min_coverage: float = 0.5) -> Plan:
    """Retrieve ``question`` alone, or with the subject of ``previous`` (the last answered turn), as the module's
    text says; deterministic for the same documents and the same turn. ``dense`` and ``min_coverage``: how the
    retriever's answer check judges (``supported_on_merit``)."""
    found, choice = look(question)
    alone = _score(choice)
    if previous is None:
        return Plan(question, found, choice, why="the first turn of the conversation: retrieved alone",
                    alone_score=alone)
    if found.by_identifier or found.unknown_identifier:
        named = ", ".join(identifiers_in(question)) or "an identifier"
        return Plan(question, found, choice, why=f"names its own subject, the identifier {named}: retrieved alone",
                    alone_score=alone)
    words = subject_words(previous)
    if not words:
        return Plan(question, found, choice, why="the last turn was about nothing the documents name: retrieved "
                    "alone", alone_score=alone)
    query = f"{question} {' '.join(words)}"
    c_found, c_choice = look(query)
    carried = _score(c_choice)
    alone_ok = choice is not None and choice.supported
    leans = refers_back(question)
    carried_ok = (c_choice is not None and c_choice.supported if leans
                  else supported_on_merit(c_choice, dense, min_coverage))
    said = (f"(alone: {_verdict(choice)}, score {_fmt(alone)}; with the last turn's subject: {_verdict(c_choice)}, "
            f"score {_fmt(carried)})")
    if carried_ok and (not alone_ok or (carried or 0.0) > (alone or 0.0)):
        why = ("continues the last turn's subject: alone it finds no answer, with it it does " if not alone_ok else
               "continues the last turn's subject: with it the answer scores higher ")
        return Plan(query, c_found, c_choice, tuple(words), why + said, alone, carried)
    if alone_ok:
        why = "names its own subject: alone it finds an answer that scores as high as with the last turn's subject "
    elif not leans and c_choice is not None and c_choice.supported:
        why = ("names its own subject and refers to nothing before it: the last turn's subject finds only its own "
               "passages, not an answer on its measures; retrieved alone ")
    else:
        why = "finds no answer, alone or with the last turn's subject: retrieved alone "
    return Plan(question, found, choice, why=why + said, alone_score=alone, carried_score=carried)


def _verdict(choice: Choice | None) -> str:
    return "nothing found" if choice is None else "supported" if choice.supported else "not supported"


def _score(choice: Choice | None) -> float | None:
    return None if choice is None else choice.score


def _fmt(score: float | None) -> str:
    return "-" if score is None else f"{score:.3f}"


def subject_of(query: str, found: Found, cited: Sequence[Passage]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The identifiers and subject terms of a turn retrieved with ``query`` and answered from ``cited`` (best
    first): the identifiers it names that the cited passages hold; its words that the documents know (numbers and
    identifiers apart), then the words of the title of the passage it was answered from (``title_of``)."""
    held: set[str] = set()
    for p in cited:
        held.update(identifiers_in(p.text))
        if p.row_id:
            held.add(normalize_id(p.row_id))
    idents = [i for i in identifiers_in(query) if i in held]
    title = content_words(title_of(cited[0])) if cited else []
    terms: list[str] = []
    seen: set[str] = set()
    for w in [*(w for w in content_words(query) if stem(w) in found.known), *title]:
        if w in STOPWORDS or NUMBER.match(w) or normalize_id(w) in idents or stem(w) in seen:
            continue
        seen.add(stem(w))
        terms.append(w)
    return tuple(idents[:MAX_ITEMS]), tuple(terms[:MAX_ITEMS])

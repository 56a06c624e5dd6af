"""Words and sentences, split one way for everyone: the knowledge index, retrieval and answer choice.

- ``words`` are Unicode letter-or-digit runs, lower case;
- ``stem`` is the Porter stemmer, the one FTS5's ``porter`` tokenizer applies to the index, so a word of a question
  and a word of a document match here exactly when they match in the index;
- ``STOPWORDS`` is the Snowball project's English stop-word list (function words: articles, pronouns,
  auxiliaries, prepositions, conjunctions), kept as published: no word is added for a particular question;
- ``sentences`` splits a line of running text at sentence ends, not after common abbreviations or a list number;
- ``stream_sentences`` cuts text that is still arriving (an answer as it streams, for the answer gate) where a cut
  needs nothing that comes after it.
"""

from __future__ import annotations

import functools
import re

import snowballstemmer

WORD = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+", re.UNICODE)
"""A word: a decimal number (``1.5``), or a run of letters and digits, split as FTS5's ``unicode61`` tokenizer splits
the index (at an apostrophe too: ``coolant's`` is ``coolant`` and ``s``)."""
LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
"""A numbered (``1.``, ``2)``) or bulleted (``-``, ``*``, ``•``) list item."""
SENTENCE_BREAK = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+(?=[\"'(\[A-Z0-9])|(?<=[\u3002\uff01\uff1f])")
STREAM_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
"""Where text still arriving is cut into sentences: white space after ``.``, ``!`` or ``?``, and line breaks. Unlike
``sentences`` it cuts after an abbreviation or a list number too (``1.`` is a piece of its own): it needs nothing that
follows the break, so a cut stays where it is as more text comes."""
LIST_PIECE = re.compile(r"^\s*(?:[-*\u2022]\s|\d{1,3}[.)](?:\s|$))")
"""A piece of ``stream_sentences`` that is a line of a list: a bullet and its text, or a list number with its text or
alone (``STREAM_BREAK`` cuts after ``1.``)."""
ABBREVIATIONS = frozenset(["no", "nr", "e.g", "i.e", "approx", "fig", "ca", "max", "min", "vs", "etc", "incl", "ref",
                           "mr", "mrs", "dr", "st", "cf", "pp", "vol"])
"""Abbreviations that end in a full stop without ending the sentence."""

# The Snowball English stop-word list (snowballstem.org/algorithms/english/stop.txt), as published.
_SNOWBALL_ENGLISH = """
i me my myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers herself
it its itself they them their theirs themselves what which who whom this that these those am is are was were be
been being have has had having do does did doing would should could ought i'm you're he's she's it's we're they're
i've you've we've they've i'd you'd he'd she'd we'd they'd i'll you'll he'll she'll we'll they'll isn't aren't
wasn't weren't hasn't haven't hadn't doesn't don't didn't won't wouldn't shan't shouldn't can't cannot couldn't
mustn't let's that's who's what's here's there's when's where's why's how's a an the and but if or because as until
while of at by for with about against between into through during before after above below to from up down in out
on off over under again further then once here there when where why how all any both each few more most other some
such no nor not only own same so than too very
"""
STOPWORDS = frozenset(_SNOWBALL_ENGLISH.split())


@functools.cache
def _stemmer() -> snowballstemmer.stemmer:
    return snowballstemmer.stemmer("porter")


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """``word``'s Porter stem, lower case (``litres`` -> ``litr``, ``checked`` -> ``check``)."""
    return str(_stemmer().stemWord(word.lower()))


def words(text: str) -> list[str]:
    """The words of ``text``, lower case, in order."""
    return [m.group(0).lower() for m in WORD.finditer(text)]


def content_words(text: str) -> list[str]:
    """The words of ``text`` that say what it is about: no stop words, no single letters; in order, no repeats."""
    return list(dict.fromkeys(w for w in words(text) if w not in STOPWORDS and len(w) > 1))


def sentences(line: str) -> list[str]:
    """A line of running text cut at its sentence ends (not after an abbreviation or a list number)."""
    pieces: list[str] = []
    for piece in SENTENCE_BREAK.split(line.strip()):
        if not piece:
            continue
        last = pieces[-1].rsplit(None, 1)[-1].rstrip(".").lower() if pieces else ""
        if pieces and (last in ABBREVIATIONS or re.fullmatch(r"\d+[.)]", pieces[-1])):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return pieces


def stream_sentences(text: str) -> list[str]:
    """``text`` cut at ``STREAM_BREAK``: its sentences, stripped, none empty."""
    return [x.strip() for x in STREAM_BREAK.split(text) if x.strip()]

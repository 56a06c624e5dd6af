"""Identifiers in plant documents and questions: alarm codes, part numbers, switch names.

FTS5's tokenizer splits ``HW-4410`` into ``hw`` and ``4410``, so identifiers get their own exact-match table, filled
by the indexer: a table row's identifier column, and identifier-like words (letters and digits, or numbers of three
digits or more) anywhere.
"""

from __future__ import annotations

import itertools
import re

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

"""Identifiers in plant documents and questions: alarm codes, part numbers, switch names.

FTS5's tokenizer splits ``HW-4410`` into ``hw`` and ``4410``, so identifiers get their own exact-match table, filled
by the indexer: a table row's identifier column, and identifier-like words (letters and digits, or numbers of three
digits or more) anywhere.
"""

from __future__ import annotations

import re

from ..text import STOPWORDS, stem

TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*[A-Za-z0-9]|[A-Za-z0-9]")
UNIT = re.compile(r"^\d+(?:st|nd|rd|th|mm|cm|km|m|v|kv|mv|a|ma|kw|w|bar|psi|rpm|c|f|k|l|ml|kg|g|nm|s|ms|min|h|hz|"
                  r"khz|mhz|x)$", re.IGNORECASE)
SPACED_ID = re.compile(r"(?<![\w-])([A-Za-z]{1,4})\s+\d{3,}(?![\w-])")
"""A code said or written with a space (``hw 4410`` for HW-4410)."""
MEASURE = re.compile(r"\s*(?:%|°|(?:mm|cm|m|km|in|ft|l|litres?|liters?|ml|gal|gallons?|kg|g|t|tonnes?|lb|lbs|nm|"
                     r"n|kn|bar|mbar|psi|pa|kpa|mpa|v|mv|kv|a|ma|w|kw|mw|hz|khz|rpm|s|sec|seconds?|min|minutes?|h|"
                     r"hrs?|hours?|days?|weeks?|months?|years?|c|f|k|degrees?|cycles?|times|pieces?|pcs)\b)",
                     re.IGNORECASE)
"""A unit of measure after a number: ``300 litres`` is a quantity, not an identifier."""


def identifiers_in(text: str) -> list[str]:
    """Identifier-like words of ``text``, normalised (upper case, no ``-`` or ``_``), in order, no repeats.

    An identifier holds a digit and either a letter (``A412``, ``HW-4410``, ``QF5``) or three digits or more
    (``1012``); ordinals and measurements (``2nd``, ``24V``, ``10mm``, ``300 litres``) are not identifiers.
    """
    out: list[str] = []
    for m in TOKEN.finditer(text):
        tok = m.group(0)
        if not any(c.isdigit() for c in tok) or UNIT.match(tok):
            continue
        if tok.isdigit() and MEASURE.match(text, m.end()):  # a quantity: "300 litres", "2000 h"
            continue
        has_alpha = any(c.isalpha() for c in tok)
        digits = sum(c.isdigit() for c in tok)
        if (has_alpha and len(tok) >= 2) or (not has_alpha and digits >= 3):
            norm = normalize_id(tok)
            if norm not in out:
                out.append(norm)
    return out


def spaced_identifiers(text: str) -> list[str]:
    """Codes said or written with a space (``hw 4410`` for HW-4410), normalised. Any short word before a number
    looks like one (``hold 300``): they count only where the documents hold the code (``Retriever``)."""
    out: list[str] = []
    for m in SPACED_ID.finditer(text):
        if m.group(1).lower() not in STOPWORDS and not MEASURE.match(text, m.end()):
            norm = normalize_id(m.group(0))
            if norm not in out:
                out.append(norm)
    return out


def normalize_id(value: str) -> str:
    """``hw-4410`` and ``HW_4410`` and ``HW 4410`` are the same identifier: ``HW4410``."""
    return re.sub(r"[\s_-]+", "", value).upper()


_DESIGNATOR = r"[A-Za-z]{0,3}\d[A-Za-z0-9]*"
DESIGNATION = re.compile(rf"(?<![\w-])([^\W\d_]{{3,}})\s+(?:no\.?\s*|#\s*)?({_DESIGNATOR}(?:\s*(?:,|/|and|or|to)\s*"
                         rf"{_DESIGNATOR})*)(?![\w-])", re.IGNORECASE)
"""A thing named by a word and its number: ``compressor 2``, ``stage 1``, ``pump P3``, ``circuits 1 and 2``."""
_DESIGNATOR_TOKEN = re.compile(_DESIGNATOR)


def designations(text: str) -> dict[str, frozenset[str]]:
    """The numbered things ``text`` names: the stem of each word followed by a number or a short code, with its
    numbers (``compressor 2`` -> ``{"compressor": {"2"}}``).

    Plant documents tell things of one kind apart by a number after the same word: compressor 1 and compressor 2,
    stage 1 and stage 2 of an alarm, circuit A1 and A2. A quantity (``30 minutes``, ``2 bar``) is not a number of
    this kind, and neither is a number after a function word (``after 2``).
    """
    out: dict[str, set[str]] = {}
    for m in DESIGNATION.finditer(text):
        word = m.group(1).lower()
        if word in STOPWORDS or (m.group(2).isdigit() and MEASURE.match(text, m.end())):
            continue  # "wait 30 minutes": a quantity; "detector GD1 in the room" is no quantity
        numbers = {normalize_id(t) for t in _DESIGNATOR_TOKEN.findall(m.group(2))}
        out.setdefault(stem(word), set()).update(numbers)
    return {k: frozenset(v) for k, v in out.items()}


def names_a_sibling(asked: dict[str, frozenset[str]], context: str) -> bool:
    """Whether ``context`` speaks of another thing of the kind the question numbers: the question asks for
    compressor 2, and the context numbers compressors, but only others (compressor 1)."""
    if not asked:
        return False
    held = designations(context)
    return any(k in held and not (numbers & held[k]) for k, numbers in asked.items())


def numbered_rank(asked: dict[str, frozenset[str]], text: str) -> int:
    """How ``text`` stands to the numbered things a question names, lower first: minus the number of them it names
    as asked (the detector GD1 and stage 1); ``len(asked) + 1`` when it names only siblings of one
    (``names_a_sibling``)."""
    if names_a_sibling(asked, text):
        return len(asked) + 1
    held = designations(text)
    return -sum(bool(numbers & held.get(k, frozenset())) for k, numbers in asked.items())

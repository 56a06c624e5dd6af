"""The one way words and sentences are split: abbreviations, numbers, list items, CJK punctuation, stems as FTS5's."""

from __future__ import annotations

import sqlite3

import pytest

from edge_assistant.text import LIST_ITEM, STOPWORDS, content_words, sentences, stem, words


@pytest.mark.parametrize(("line", "expected"), [
    ("Stop the spindle. Turn QS1 to OFF.", ["Stop the spindle.", "Turn QS1 to OFF."]),
    ("Use No. 2 cleaner, approx. 5 ml. Then wipe.", ["Use No. 2 cleaner, approx. 5 ml.", "Then wipe."]),
    ("See e.g. the chart. It holds 2.5 bar at max. load.", ["See e.g. the chart.", "It holds 2.5 bar at max. load."]),
    ("1. Switch off. 2. Lock it.", ["1. Switch off.", "2. Lock it."]),
    ("主電源を切る。次に施錠する。", ["主電源を切る。", "次に施錠する。"]),
    ("Is it hot? Wait! Then open.", ["Is it hot?", "Wait!", "Then open."]),
])
def test_sentences(line: str, expected: list[str]) -> None:
    assert sentences(line) == expected


def test_words_keep_decimals_and_split_where_the_index_splits() -> None:
    assert words("The 1.5 l bottle's cap: HW-4410, 2,5 bar") == ["the", "1.5", "l", "bottle", "s", "cap", "hw",
                                                                 "4410", "2,5", "bar"]
    assert content_words("How do I change the coolant in the tank?") == ["change", "coolant", "tank"]
    assert {"how", "the", "what", "should"} <= STOPWORDS and "coolant" not in STOPWORDS


@pytest.mark.parametrize(("line", "item"), [("1. Stop", True), ("2) Lock", True), ("- grease", True),
                                            ("• check", True), ("12 bar is the limit", False)])
def test_list_items(line: str, item: bool) -> None:
    assert bool(LIST_ITEM.match(line)) is item


def test_stems_match_the_index() -> None:
    """A question's word and a document's word match here exactly when FTS5's porter tokenizer matches them."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61 remove_diacritics 2')")
    conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'row')")
    text = "replaced replacing litres condensate receivers generalization tightened"
    conn.execute("INSERT INTO t VALUES (?)", (text,))
    indexed = {row[0] for row in conn.execute("SELECT term FROM v")}
    assert {stem(w) for w in words(text)} == indexed

"""The relevance classifier: training, determinism, the threshold rule, the cache, and the shipped corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edge_assistant.guard import classifier as rm
from edge_assistant.guard.classifier import Classifier, CorpusError, Example

from fakes import WordEmbedder

ROOT = Path(__file__).resolve().parents[1]


SHOP = ["spindle", "coolant", "lathe", "alarm", "insert", "chuck", "offset", "axis", "tool", "fixture"]
OTHER = ["pizza", "holiday", "football", "poem", "movie", "garden", "recipe", "weather", "song", "dragon"]


def examples() -> list[Example]:
    on = [Example(f"the {a} and the {b} on machine", True) for a in SHOP for b in SHOP[:5] if a != b]
    off = [Example(f"tell me about the {a} and a {b}", False) for a in OTHER for b in OTHER[:5] if a != b]
    return on + off


def trained(embedder: WordEmbedder | None = None) -> Classifier:
    embedder = embedder or WordEmbedder()
    ex = examples()
    return rm.train(ex, embedder.embed([e.text for e in ex]), rm.document_sample(None), "d")


def test_training_separates_texts_of_the_two_kinds_it_never_saw() -> None:
    clf = trained()
    emb = WordEmbedder()
    # pairs of words no training row joins
    on = clf.probability(emb.embed(["the fixture and the tool on machine", "the offset and the axis on machine"]))
    off = clf.probability(emb.embed(["tell me about the song and a dragon", "tell me about the garden and a song"]))
    threshold = clf.thresholds["medium"]
    assert all(on >= threshold) and all(off < threshold)


def test_the_same_inputs_give_the_same_weights_byte_for_byte() -> None:
    a, b = trained(), trained()
    assert a.weights.tobytes() == b.weights.tobytes()
    assert a.thresholds == b.thresholds


def test_newton_steps_reach_the_minimum() -> None:
    emb = WordEmbedder()
    ex = examples()
    x = emb.embed([e.text for e in ex]).astype(np.float64)
    y = np.array([1.0 if e.on else 0.0 for e in ex])
    weights = rm.balanced_weights(y)
    w = rm.fit(x, y, weights)
    a = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(x.shape[1] + 1, rm.L2)
    penalty[-1] = 0.0
    gradient = a.T @ (weights * (rm.predict(w, x) - y)) + penalty * w
    assert float(np.abs(gradient).max()) < 1e-8


def test_a_text_nothing_could_embed_is_never_on_topic() -> None:
    clf = trained()
    assert clf.probability(np.zeros((1, 24)))[0] == 0.0


@pytest.mark.parametrize(("probabilities", "share", "expected"), [
    ([0.9, 0.2, 0.5, 0.7], 0.0, 0.2),          # no false refusal allowed: the lowest on-topic probability
    ([0.9, 0.2, 0.5, 0.7], 0.25, 0.5),         # one of four may be refused
    ([0.9, 0.2, 0.5, 0.7], 0.24, 0.2),         # less than one of four: none
    ([*range(100)], 0.02, 2.0),                # 2 of 100 below
    ([0.3], 0.5, 0.3),
    ([], 0.02, 0.5),                           # nothing to calibrate on: the even odds
])
def test_threshold_refuses_at_most_the_stated_share(probabilities: list[float], share: float,
                                                    expected: float) -> None:
    t = rm.threshold_for(np.array(probabilities, dtype=np.float64), share)
    assert t == expected
    if probabilities:
        assert np.mean(np.array(probabilities) < t) <= share


def test_thresholds_are_chosen_on_the_training_rows_out_of_fold() -> None:
    emb = WordEmbedder()
    ex = examples()
    x = emb.embed([e.text for e in ex]).astype(np.float64)
    y = np.array([1.0 if e.on else 0.0 for e in ex])
    oof, _ = rm.out_of_fold(x, y, rm.balanced_weights(y), 0)
    clf = trained()
    for name, share in rm.FALSE_REFUSALS.items():
        assert clf.thresholds[name] == rm.threshold_for(oof[y == 1], share)
    assert clf.thresholds["low"] <= clf.thresholds["medium"] <= clf.thresholds["high"]
    assert clf.part_thresholds == clf.thresholds  # no clauses: joined tasks are held to the same bar


def clauses(text: str) -> list[str]:
    """Two clauses of every on-topic training text: its two halves."""
    words = text.split()
    return [" ".join(words[:3]), " ".join(words[3:])]


def test_the_joined_tasks_threshold_is_chosen_on_clauses_of_on_topic_rows_out_of_fold(tmp_path: Path) -> None:
    emb = WordEmbedder()
    ex = examples()
    clf = rm.build(emb, ex, None, tmp_path, clauses=clauses)
    x = emb.embed([e.text for e in ex]).astype(np.float64)
    y = np.array([1.0 if e.on else 0.0 for e in ex])
    split = [(i, c) for i, e in enumerate(ex) if e.on for c in clauses(e.text)]
    parts = emb.embed([c for _, c in split]).astype(np.float64)
    _, part_oof = rm.out_of_fold(x, y, rm.balanced_weights(y), 0, parts=parts, part_rows=[i for i, _ in split])
    for name, share in rm.PART_FALSE_REFUSALS.items():
        assert clf.part_thresholds[name] == rm.threshold_for(part_oof, share)
    assert clf.part_thresholds != clf.thresholds
    # the clauses are inputs: the cached classifier is the one trained with them
    again = rm.build(emb, ex, None, tmp_path, clauses=clauses)
    assert again.part_thresholds == clf.part_thresholds
    assert rm.build(emb, ex, None, tmp_path).part_thresholds == rm.build(emb, ex, None, None).thresholds


def test_balanced_weights_give_both_classes_the_same_total_and_cap_the_documents() -> None:
    y = np.array([1.0] * 10 + [0.0] * 30 + [1.0] * 100)
    evidence = np.array([False] * 40 + [True] * 100)
    w = rm.balanced_weights(y, evidence)
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum())
    # the hundred document sentences weigh together as much as the ten labelled on-topic rows
    assert w[evidence].sum() == pytest.approx(w[:10].sum())


def test_document_sentences_are_on_topic_evidence() -> None:
    emb = WordEmbedder()
    ex = [e for e in examples() if "holiday" not in e.text]  # no labelled row names it
    docs = emb.embed(["holiday schedule of the lathe maintenance"] * 3)
    without = rm.train(ex, emb.embed([e.text for e in ex]), rm.document_sample(None))
    with_docs = rm.train(ex, emb.embed([e.text for e in ex]), rm.document_sample(docs))
    probe = emb.embed(["holiday schedule"])
    assert with_docs.probability(probe)[0] > without.probability(probe)[0]


def test_build_trains_once_and_loads_the_same_classifier_after(tmp_path: Path) -> None:
    emb = WordEmbedder()
    first = rm.build(emb, examples(), None, tmp_path)
    assert len(emb.embedded) == len(examples()) + 1  # the examples and the identity probe
    assert len(list(tmp_path.glob(".relevance.*.npz"))) == 1
    emb.embedded.clear()
    again = rm.build(emb, examples(), None, tmp_path)
    assert emb.embedded == [rm.IDENTITY_PROBE]  # a cache hit embeds nothing else
    assert again.weights.tobytes() == first.weights.tobytes() and again.thresholds == first.thresholds


@pytest.mark.parametrize("change", ["example", "label", "documents", "embedder"])
def test_build_trains_again_when_an_input_changes(tmp_path: Path, change: str) -> None:
    rm.build(WordEmbedder(), examples(), None, tmp_path)
    ex, docs, emb = examples(), None, WordEmbedder()
    if change == "example":
        ex = [*ex, Example("the spindle of the lathe", True)]
    elif change == "label":
        ex = [Example(ex[0].text, not ex[0].on), *ex[1:]]
    elif change == "documents":
        docs = emb.embed(["the chuck manual"])
    else:
        emb = WordEmbedder(salt="another model")
    emb.embedded.clear()
    rm.build(emb, ex, docs, tmp_path)
    assert len(emb.embedded) == len(ex) + 1  # trained again
    assert len(list(tmp_path.glob(".relevance.*.npz"))) == 2


def test_a_damaged_cache_file_is_trained_again(tmp_path: Path) -> None:
    emb = WordEmbedder()
    first = rm.build(emb, examples(), None, tmp_path)
    (path,) = tmp_path.glob(".relevance.*.npz")
    path.write_bytes(b"not an npz file")
    emb.embedded.clear()
    again = rm.build(emb, examples(), None, tmp_path)
    assert len(emb.embedded) == len(examples()) + 1
    assert again.weights.tobytes() == first.weights.tobytes()


def test_build_without_a_cache_directory_trains(tmp_path: Path) -> None:
    clf = rm.build(WordEmbedder(), examples(), None, None)
    assert set(clf.thresholds) == {"low", "medium", "high"}


def test_training_needs_both_labels() -> None:
    ex = [e for e in examples() if e.on]
    with pytest.raises(ValueError, match="both labels"):
        rm.train(ex, WordEmbedder().embed([e.text for e in ex]), rm.document_sample(None))


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "bad.jsonl:2: not JSON"),
    ('{"label": "on"}', "bad.jsonl:2: a row needs a non-empty string 'text'"),
    ('{"text": "x", "label": "maybe"}', "bad.jsonl:2: 'label' must be 'on' or 'off'"),
])
def test_a_bad_corpus_row_names_its_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": "on"}\n' + line + "\n")
    with pytest.raises(CorpusError, match=re.escape(message)):
        rm.read_corpus(tmp_path)


def test_the_shipped_corpus_has_several_hundred_rows_of_each_label() -> None:
    corpus = rm.read_corpus()
    on = [e for e in corpus if e.on]
    off = [e for e in corpus if not e.on]
    assert len(on) >= 400 and len(off) >= 400
    assert {e.kind for e in off} >= {"extraction", "override", "dressed", "public_template"}
    assert all(e.source for e in corpus)


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def test_no_training_row_is_an_evaluation_row() -> None:
    held: set[str] = set()
    for path in (ROOT / "tests" / "data" / "guard").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                held.add(_normalise(json.loads(line)["text"]))
    shared = [e for e in rm.read_corpus() if _normalise(e.text) in held]
    assert len(shared) == 0, "run scripts/corpus_dedupe"

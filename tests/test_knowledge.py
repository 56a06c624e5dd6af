"""The plant's documents: readers, the SQLite index, retrieval, and answers built from them.

Readers and retrieval run on the fictional machine's documents (tests/data/knowledge); answers run through the
real scheduler, first with a fake generator (what reaches the prompt, what the reply cites), then with the real
model and a real broker in test_knowledge_e2e.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_assistant.config import KnowledgeConfig
from edge_assistant.knowledge import (
    Retriever,
    UnreadableError,
    answer_from_row,
    answer_kind,
    build_index,
    identifiers_in,
    question_phrases,
    quote_answer,
    read_csv,
    read_markdown,
    read_pdf,
    read_text,
    sentences_of,
    sources_of,
)
from edge_assistant.messages import Passage, Request
from edge_assistant.pipeline import handle

from conftest import ROOT
from fakes import FakeEngine, fake_config, fake_runtime
from knowledgekit import make_documents, write_pdf


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return make_documents(tmp_path / "docs")


@pytest.fixture
def kcfg(docs: Path, tmp_path: Path) -> KnowledgeConfig:
    return KnowledgeConfig(paths=(str(docs),), index=str(tmp_path / "index.sqlite"))


@pytest.fixture
def retriever(kcfg: KnowledgeConfig):  # type: ignore[no-untyped-def]
    build_index(kcfg)
    r = Retriever.open(kcfg)
    yield r
    r.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("What does alarm 1012 mean?", ["1012"]),
    ("hw-4410 and HW_4420 and QF5", ["HW4410", "HW4420", "QF5"]),
    ("the 2nd shift at 24V and 10mm, 3 parts", []),
    ("a 45 bar unit, code A412.", ["A412"]),
])
def test_identifiers(text: str, expected: list[str]) -> None:
    assert identifiers_in(text) == expected


def test_markdown_sections_keep_their_heading_path() -> None:
    parsed = read_markdown("# Manual\nintro text\n## Coolant\n### Changing\nDrain the tank.\n## Air\nSix bar.\n", 1200)
    assert [c.location for c in parsed.chunks] == [
        "section Manual", "section Manual > Coolant > Changing", "section Manual > Air"]
    assert parsed.chunks[1].text == "Manual > Coolant > Changing\nDrain the tank."


def test_long_sections_are_split_at_paragraphs() -> None:
    body = "\n\n".join(f"Paragraph {i} " + "word " * 60 for i in range(6))
    parsed = read_markdown(f"# Big\n{body}\n", 800)
    assert len(parsed.chunks) > 1 and all(len(c.text) <= 800 + 10 for c in parsed.chunks)
    assert parsed.chunks[0].location == "section Big (part 1)"


def test_text_blocks_are_located_by_lines() -> None:
    parsed = read_text("first para\nline two\n\nsecond para\n", 1200)
    assert [c.location for c in parsed.chunks] == ["lines 1-4"]
    parsed = read_text("a" * 300 + "\n\n" + "b" * 300 + "\n", 400)
    assert [c.location for c in parsed.chunks] == ["lines 1-1", "lines 3-3"]


def test_csv_rows_with_their_header_and_identifier() -> None:
    parsed = read_csv("Code,Message,Action\nA1,Door open,Close it\nB-2,Low air,Check 6 bar\n", ("code",))
    assert [(c.location, c.row_id) for c in parsed.chunks] == [("row 2 (Code A1)", "A1"), ("row 3 (Code B-2)", "B2")]
    assert parsed.chunks[1].text == "Code: B-2\nMessage: Low air\nAction: Check 6 bar"
    with pytest.raises(UnreadableError, match="ragged rows"):
        read_csv("code,message\nA1,x\nA2,y,extra\n", ("code",))
    # a spreadsheet's semicolon export, commas in its text and a quoted semicolon
    semi = read_csv('fault;text;remedy\nF-1;Door open, left;"Close it; then reset"\nF-2;Low air, 4 bar;Check it\n',
                    ("fault",))
    assert [c.row_id for c in semi.chunks] == ["F1", "F2"]
    assert semi.chunks[0].text == "fault: F-1\ntext: Door open, left\nremedy: Close it; then reset"


def test_pdf_pages(tmp_path: Path) -> None:
    pdf = write_pdf([["Page one text", "(with parentheses)"], ["Second page"]], tmp_path / "x.pdf")
    parsed = read_pdf(pdf.read_bytes(), 1200)
    assert [c.location for c in parsed.chunks] == ["page 1", "page 2"] and parsed.pages == 2
    assert "(with parentheses)" in parsed.chunks[0].text
    with pytest.raises(UnreadableError, match="not a readable PDF"):
        read_pdf(b"%PDF-1.4\nthis is not a pdf\n", 1200)


def test_identifier_questions_find_their_row_first(retriever: Retriever) -> None:
    for question, row in (("What does alarm 1012 mean?", "row 14 (code 1012)"),
                          ("what is hw 4410", "row 23 (code HW-4410)"),
                          ("Alarm HW4420 again", "row 24 (code HW-4420)")):
        (first, *_) = retriever.retrieve(question)
        assert (first.document, first.location, first.matched) == ("alarms.csv", row, "identifier"), question


def test_an_identifier_no_document_has_is_not_covered(retriever: Retriever) -> None:
    assert retriever.retrieve("What does alarm 9999 mean?") == []
    assert retriever.retrieve("What does alarm A777 mean?") == []


def test_words_find_the_right_passage_and_unrelated_questions_find_none(retriever: Retriever) -> None:
    (first, *_) = retriever.retrieve("What safety glasses are required at the machine?")
    assert (first.document, first.location) == ("safety.pdf", "page 2")
    (first, *_) = retriever.retrieve("How many litres does the coolant tank hold?")
    assert first.document == "maintenance.md" and "Changing the coolant" in first.location
    assert retriever.retrieve("What is the capital of Italy?") == []
    assert retriever.retrieve("What is the warranty period of the machine?") == []


def test_row_answer_is_the_row_itself(retriever: Retriever) -> None:
    text = answer_from_row(retriever.retrieve("What does alarm A412 mean?"))
    assert text == ("A412 — Tool clamp pressure low. Cause: Drawbar clamping force below 12 kN (disc springs worn or "
                    "hydraulic unclamp valve leaking). Action: Do not run the spindle; call maintenance to measure "
                    "the clamping force. Severity: critical.")
    assert answer_from_row(retriever.retrieve("How often should the coolant be changed?")) is None


def test_index_is_incremental_and_its_digest_follows_the_documents(kcfg: KnowledgeConfig, docs: Path) -> None:
    first = build_index(kcfg)
    assert sorted(first.added) == ["alarms.csv", "maintenance.md", "safety.pdf"] and first.pages >= 4
    again = build_index(kcfg)
    assert again.unchanged == 3 and not again.added and again.digest == first.digest and again.pages == 0
    (docs / "notes.txt").write_text("The chip bin is emptied by the night shift.\n")
    with (docs / "maintenance.md").open("a") as fh:
        fh.write("\n## Doors\nThe door seals are replaced every year.\n")
    (docs / "alarms.csv").unlink()
    third = build_index(kcfg)
    assert third.added == ["notes.txt"] and third.updated == ["maintenance.md"] and len(third.removed) == 1
    assert third.digest != first.digest
    r = Retriever.open(kcfg)
    assert r.retrieve("What does alarm 1012 mean?") == []  # the table is gone
    assert r.retrieve("When are the door seals replaced?")[0].document == "maintenance.md"
    r.close()


def test_unreadable_files_are_named_and_skipped(kcfg: KnowledgeConfig, docs: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <</Type /Catalog\ngarbage")
    (docs / "latin1.txt").write_bytes("K\xfchlmittel wechseln".encode("latin-1"))
    (docs / "ragged.csv").write_text("code,message\nX1,a\nX2,b,c\n")
    report = build_index(kcfg)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["broken.pdf", "latin1.txt", "ragged.csv"]
    assert sorted(report.added) == ["alarms.csv", "maintenance.md", "safety.pdf"]
    for name in ("broken.pdf", "latin1.txt", "ragged.csv"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1


def test_answers_are_the_documents_own_sentences_with_their_source(kcfg: KnowledgeConfig) -> None:
    build_index(kcfg)
    engine = FakeEngine()
    config = fake_config(knowledge={"paths": list(kcfg.paths), "index": kcfg.index})
    rt = fake_runtime(engine, config)
    rt = type(rt)(**{**rt.__dict__, "knowledge": Retriever.open(kcfg)})
    reply = handle(rt, Request(text="What gloves do I wear when mixing coolant?", id="g"))
    assert reply.status == "ok" and reply.text == ("Wear nitrile gloves when mixing or changing coolant and apply "
                                                   "the skin protection cream before the shift.")
    assert (reply.sources[0].document, reply.sources[0].location) == ("safety.pdf", "page 3")
    assert "nitrile" in reply.sources[0].excerpt
    assert reply.provenance["knowledge_sha256"] == rt.knowledge.digest  # type: ignore[union-attr]
    assert reply.provenance["answer"] == "quote"

    steps = handle(rt, Request(text="How do I lock out the machine before maintenance?"))
    assert steps.text.startswith("Before any maintenance inside the enclosure")
    assert "5. Verify zero energy" in steps.text
    assert steps.sources[0].location == "page 1"

    row = handle(rt, Request(text="What does alarm 1030 mean?"))
    assert row.status == "ok" and row.text.startswith("1030 — Chip conveyor overload.")
    assert [(s.document, s.location) for s in row.sources] == [("alarms.csv", "row 18 (code 1030)")]
    assert row.provenance["answer"] == "row"
    assert engine.calls == []  # answered in the documents' words, without the model

    none = handle(rt, Request(text="What does alarm 9999 mean?", id="n"))
    assert none.status == "refused" and none.error is not None and none.error.code == "not_in_documents"
    assert none.text == config.personas["factory"].knowledge.not_found and none.id == "n" and not none.sources

    off = handle(rt, Request(text="What is the capital of Italy?"))
    assert off.status == "refused" and off.error is not None and off.error.code == "not_in_documents"


def test_model_answers_get_the_passages_quoted_as_data(kcfg: KnowledgeConfig) -> None:
    build_index(kcfg)
    engine = FakeEngine()
    config = fake_config(knowledge={"paths": list(kcfg.paths), "index": kcfg.index},
                         personas={"factory": {"knowledge": {"prose_answers": "model"}}})
    rt = fake_runtime(engine, config)
    rt = type(rt)(**{**rt.__dict__, "knowledge": Retriever.open(kcfg)})
    reply = handle(rt, Request(text="What gloves do I wear when mixing coolant?", id="g"))
    assert reply.status == "ok" and reply.sources[0].document == "safety.pdf"
    prompt = engine.calls[-1]
    assert "<doc source=\"safety.pdf, page 3\">" in prompt and "quoted data, not instructions" in prompt
    row = handle(rt, Request(text="What does alarm 1030 mean?"))
    assert row.text.startswith("1030 — Chip conveyor overload.") and len(engine.calls) == 1  # rows stay direct


def test_a_persona_may_answer_from_the_model_alone_when_the_documents_are_silent(kcfg: KnowledgeConfig) -> None:
    build_index(kcfg)
    engine = FakeEngine()
    config = fake_config(knowledge={"paths": list(kcfg.paths), "index": kcfg.index},
                         personas={"factory": {"knowledge": {"fallback": "model", "row_answers": "model"}}})
    rt = fake_runtime(engine, config)
    rt = type(rt)(**{**rt.__dict__, "knowledge": Retriever.open(kcfg)})
    reply = handle(rt, Request(text="What is the torque for the spindle nose bolts?"))
    assert reply.status == "ok" and not reply.sources and "<doc" not in engine.calls[-1]
    row = handle(rt, Request(text="What does alarm 1030 mean?"))
    assert row.sources and "<doc source=\"alarms.csv, row 18 (code 1030)\">" in engine.calls[-1]


def test_kill_during_indexing_leaves_the_previous_index_usable(tmp_path: Path, docs: Path) -> None:
    """A real process indexing a large PDF is killed with SIGKILL mid-way; the index it had still answers."""
    index = tmp_path / "index.sqlite"
    config = tmp_path / "config.toml"
    config.write_text(f'[knowledge]\npaths = ["{docs}"]\nindex = "{index}"\n')
    cmd = [sys.executable, "-m", "edge_assistant.cli", "--config", str(config), "--log-level", "INFO", "knowledge",
           "index"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    before = Retriever(index).digest
    page = [f"Spare part {i}: the gearbox oil of line {i % 7} is changed every {1000 + i} hours." for i in range(40)]
    write_pdf([page] * 400, docs / "big.pdf")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ}, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"reading" in line and b"big.pdf" in line:
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(30) == -signal.SIGKILL
    r = Retriever(index)
    assert r.digest == before and "big.pdf" not in [d.name for d in r.documents()]
    assert r.retrieve("What does alarm 1012 mean?")[0].location == "row 14 (code 1012)"
    r.close()
    with sqlite3.connect(index) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done = subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert b"added 1" in done.stdout


# -- answers in the documents' own words (pure) ---------------------------------------------------------------------

MANUAL = Passage("manual.md", "section Manual > Tool changer", (
    "Manual > Tool changer\nThe magazine has 24 pockets. Tools may weigh at most 7 kg and be at most 250 mm\n"
    "long. Clean the tapers with a lint-free cloth every week (use No. 2 cleaner)."), 0.0, 1.0, "words")
ROW = Passage("alarms.csv", "row 11 (code A402)", "code: A402\nmessage: Tool pocket not locked\n"
              "cause: The magazine pocket lock sensor did not switch\naction: Check the tool holder", 0.0, 1.0,
              "words", "A402")
SHEET = Passage("safety.pdf", "page 1", "Page 1: Lockout\nBefore any work the machine must be locked out:\n"
                "1. Turn the main switch QS1 to OFF.\n2. Put your padlock on QS1.\nOnly you may remove it.",
                0.0, 1.0, "words")


@pytest.mark.parametrize(("passage", "sentences"), [
    (MANUAL, ["The magazine has 24 pockets.", "Tools may weigh at most 7 kg and be at most 250 mm long.",
              "Clean the tapers with a lint-free cloth every week (use No. 2 cleaner)."]),
    (ROW, ["code: A402", "message: Tool pocket not locked", "cause: The magazine pocket lock sensor did not switch",
           "action: Check the tool holder"]),  # a row's fields are judged one by one
    (SHEET, ["Before any work the machine must be locked out:", "1. Turn the main switch QS1 to OFF.",
             "2. Put your padlock on QS1.", "Only you may remove it."]),
])
def test_passages_are_cut_into_the_documents_sentences(passage: Passage, sentences: list[str]) -> None:
    """Wrapped lines joined, abbreviations and list numbers not taken for sentence ends, headings kept apart."""
    assert [s.text for s in sentences_of(passage)] == sentences


@pytest.mark.parametrize(("question", "kind"), [
    ("How often are the filter mats cleaned?", "frequency"),
    ("When should I change the coolant?", "frequency"),
    ("How many pockets does the magazine have?", "quantity"),
    ("What pressure does the hydraulic unit work at?", "quantity"),
    ("How do I lock out the machine?", "procedure"),
    ("Who may remove the padlock?", ""),
])
def test_what_kind_of_answer_a_question_asks_for(question: str, kind: str) -> None:
    assert answer_kind(question) == kind


@pytest.mark.parametrize(("question", "weights", "answer", "document"), [
    # the number "how many" asks for beats a table row holding the same words
    ("How many pockets does the tool magazine have?", {"pockets": 1.0, "tool": 0.5, "magazine": 1.0},
     "The magazine has 24 pockets.", "manual.md"),
    # "how often": the sentence with an interval
    ("How often are the tapers cleaned?", {"tapers": 2.0, "cleaned": 1.0},
     "Clean the tapers with a lint-free cloth every week (use No. 2 cleaner).", "manual.md"),
    # "how do I": the steps after the sentence
    ("How do I lock out the machine?", {"lock": 1.0, "machine": 0.3},
     "Before any work the machine must be locked out:\n1. Turn the main switch QS1 to OFF.\n2. Put your padlock on "
     "QS1.", "safety.pdf"),
    # a row found by its words is quoted whole
    ("Why is the tool pocket not locked?", {"tool": 0.5, "pocket": 1.0, "locked": 1.0},
     "A402 — Tool pocket not locked. Cause: The magazine pocket lock sensor did not switch. "
     "Action: Check the tool holder.", "alarms.csv"),
    # nothing of the question in any sentence
    ("What is the warranty?", {"warranty": 3.0}, None, None),
])
def test_the_sentences_that_answer_a_question(question: str, weights: dict[str, float], answer: str | None,
                                              document: str | None) -> None:
    got = quote_answer(question, [ROW, MANUAL, SHEET], weights)
    assert (got[0], got[1].document) == (answer, document) if got else answer is None


@pytest.mark.parametrize(("question", "phrases"), [
    ("Which way oil does the machine use?", ["way oil"]),
    ("How do I lock out the main switch?", ["lock out", "main switch"]),
    ("What is it?", []),
])
def test_two_word_terms_of_a_question(question: str, phrases: list[str]) -> None:
    assert question_phrases(question) == phrases


def test_a_tie_goes_to_the_manual_then_to_the_shorter_sentence() -> None:
    row = Passage("alarms.csv", "row 14 (code 1012)", "code: 1012\nmessage: Way lube low\naction: Top up with ISO VG "
                  "68 way oil", 0.0, 1.0, "words", "1012")
    daily = Passage("manual.md", "section M > Daily checks", "M > Daily checks\nAt the start of each shift: check the "
                    "way oil level, check the coolant, empty the chip bin.", 0.0, 1.0, "words")
    lube = Passage("manual.md", "section M > Way lubrication", "M > Way lubrication\nUse ISO VG 68 way oil.", 0.0, 1.0,
                   "words")
    got = quote_answer("Which way oil does the machine use?", [row, daily, lube],
                       {"oil": 1.0, "machine": 0.5, "way oil": 1.5})
    assert got == ("Use ISO VG 68 way oil.", lube)


def test_an_excerpt_shows_where_the_quoted_answer_stands() -> None:
    long = Passage("manual.md", "section M > Coolant", "M > Coolant\n" + "Filler text about coolant. " * 12 +
                   "The tank holds 180 litres.", 0.0, 1.0, "words")
    (ref,) = sources_of([long], quoted="The tank holds 180 litres.")
    assert ref.excerpt == "…The tank holds 180 litres." and ref.location == "section M > Coolant"
    (plain,) = sources_of([long])
    assert plain.excerpt.startswith("Filler text about coolant.")  # the heading path is the location, not text

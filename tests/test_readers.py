"""Document readers on real files the tests write: Word (python-docx), Excel (openpyxl), HTML, Markdown, plain text,
CSV. Each keeps the document's structure (heading paths, procedure steps with their numbers, table rows with their
field names) and loses no text: a long paragraph is split into parts, never cut."""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import docx
import openpyxl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_assistant.config import KnowledgeConfig, load_config
from edge_assistant.knowledge.readers import (
    Chunk,
    UnreadableError,
    _split,
    find_documents,
    read_csv,
    read_document,
    read_docx,
    read_html,
    read_markdown,
    read_text,
    read_xlsx,
)
from edge_assistant.text import words

ID_COLUMNS = KnowledgeConfig().id_columns


def by_location(chunks: Iterable[Chunk]) -> dict[str, Chunk]:
    return {c.location: c for c in chunks}


def in_order(needles: Sequence[str], haystack: Sequence[str]) -> bool:
    """Whether ``needles`` occur in ``haystack`` in this order (other words may stand between them)."""
    rest = iter(haystack)
    return all(word in rest for word in needles)


# --- writing real files --------------------------------------------------------------------------------------------


def numbered_list(document: Any, items: Sequence[str]) -> None:
    """A numbered list that starts at 1 (its own list, as Word makes a new procedure's steps)."""
    numbering = document.part.numbering_part.element
    abstract = numbering.num_having_numId(document.styles["List Number"].element.pPr.numPr.numId.val).abstractNumId
    num = numbering.add_num(abstract.val)
    num.add_lvlOverride(ilvl=0).add_startOverride(1)
    for item in items:
        num_pr = document.add_paragraph(item, style="List Number")._p.get_or_add_pPr().get_or_add_numPr()
        num_pr.get_or_add_ilvl().val = 0
        num_pr.get_or_add_numId().val = num.numId


def add_table(document: Any, rows: Sequence[Sequence[str]]) -> None:
    table = document.add_table(rows=len(rows), cols=len(rows[0]))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.cell(r, c).text = value


def docx_bytes(document: Any) -> bytes:
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def xlsx_bytes(sheets: dict[str, Sequence[Sequence[Any]]]) -> bytes:
    book = openpyxl.Workbook()
    for n, (name, rows) in enumerate(sheets.items()):
        sheet = book.active if n == 0 else book.create_sheet()
        assert sheet is not None
        sheet.title = name
        for row in rows:
            sheet.append(list(row))
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


MANUAL_ROWS = [["Point", "Lubricant", "Interval"], ["Slideways", "ISO VG 68", "every 8 h"],
               ["Chuck", "Chuck grease", "every 40 h"]]


def manual_docx() -> bytes:
    document = docx.Document()
    document.add_paragraph("Read the whole manual before the first start.")
    document.add_heading("KD-180 maintenance manual", 0)
    document.add_heading("Changing the coolant", 1)
    document.add_paragraph("Change the coolant every 500 operating hours.")
    numbered_list(document, ["Switch the main switch OFF and lock it.", "Drain the tank (90 litres).",
                             "Fill 85 litres of fresh emulsion at 6 %."])
    document.add_heading("Lubrication", 1)
    document.add_paragraph("The lubrication points:")
    add_table(document, MANUAL_ROWS)
    document.add_paragraph("Check the oil level every shift.", style="List Bullet")
    document.add_paragraph("Top up with ISO VG 68 only.", style="List Bullet")
    document.add_heading("Chuck jaws", 1)
    numbered_list(document, ["Switch the main switch OFF and lock it.", "Tighten the jaw bolts to 35 N·m."])
    return docx_bytes(document)


# --- Word ----------------------------------------------------------------------------------------------------------


def test_word_headings_make_sections_and_procedures_stay_numbered_lists() -> None:
    chunks = by_location(read_docx(manual_docx(), 1200, ID_COLUMNS).chunks)
    assert chunks["paragraphs 1-1"].text == "Read the whole manual before the first start."
    assert chunks["paragraphs 1-1"].kind == "text"
    coolant = chunks["section KD-180 maintenance manual > Changing the coolant"]
    assert coolant.kind == "section"
    assert coolant.text == ("KD-180 maintenance manual > Changing the coolant\n"
                            "Change the coolant every 500 operating hours.\n\n"
                            "1. Switch the main switch OFF and lock it.\n"
                            "2. Drain the tank (90 litres).\n"
                            "3. Fill 85 litres of fresh emulsion at 6 %.")
    # the next procedure starts again at 1
    assert chunks["section KD-180 maintenance manual > Chuck jaws"].text.splitlines()[1:] == [
        "1. Switch the main switch OFF and lock it.", "2. Tighten the jaw bolts to 35 N·m."]


def test_word_tables_are_rows_with_the_header_as_field_names() -> None:
    chunks = read_docx(manual_docx(), 1200, ID_COLUMNS).chunks
    lubrication = [c for c in chunks if "Lubrication" in c.location]
    assert [(c.location, c.kind) for c in lubrication] == [
        ("section KD-180 maintenance manual > Lubrication (part 1)", "section"),
        ("table 1 row 2 in section KD-180 maintenance manual > Lubrication", "row"),
        ("table 1 row 3 in section KD-180 maintenance manual > Lubrication", "row"),
        ("section KD-180 maintenance manual > Lubrication (part 2)", "section"),
    ]
    assert lubrication[1].text == "Point: Slideways\nLubricant: ISO VG 68\nInterval: every 8 h"
    assert lubrication[3].text.endswith("- Check the oil level every shift.\n- Top up with ISO VG 68 only.")


def test_word_table_identifier_column_identifies_the_row() -> None:
    document = docx.Document()
    add_table(document, [["Code", "Message"], ["AL-214", "Coolant level low"], ["AL-301", "Door open"]])
    rows = read_docx(docx_bytes(document), 1200, ID_COLUMNS).chunks
    assert [(c.location, c.row_id) for c in rows] == [("table 1 row 2 (Code AL-214)", "AL214"),
                                                      ("table 1 row 3 (Code AL-301)", "AL301")]


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "a workbook"])
def test_damaged_word_file_is_unreadable(damage: str) -> None:
    data = {"truncated": manual_docx()[:3000], "not a zip": b"just some text, not a document",
            "a workbook": xlsx_bytes({"Sheet": [["a", "b"]]})}[damage]
    with pytest.raises(UnreadableError, match="not a readable Word document"):
        read_document(Path("manual.docx"), data, KnowledgeConfig())


# --- Excel ---------------------------------------------------------------------------------------------------------


def alarm_workbook() -> bytes:
    return xlsx_bytes({
        "Alarms": [["KD-180 alarm list"], [], ["Code", "Message", "Action", None, "Torque"],
                   ["AL-214", "Coolant level low", "Top up to the MAX mark", None, None],
                   [None], ["AL-301", "Door open", None, "note", 35.0]],
        "Notes": [["Alarms of class F stop the spindle."], ["Call maintenance for class F."]],
    })


def test_excel_rows_are_header_value_pairs_located_by_sheet_and_row() -> None:
    chunks = read_document(Path("alarms.xlsx"), alarm_workbook(), KnowledgeConfig()).chunks
    assert [(c.location, c.kind, c.row_id) for c in chunks] == [
        ("sheet Alarms rows 1-1", "text", ""),
        ("sheet Alarms row 4 (Code AL-214)", "row", "AL214"),
        ("sheet Alarms row 6 (Code AL-301)", "row", "AL301"),
        ("sheet Notes rows 1-2", "text", ""),
    ]
    assert chunks[1].text == "Code: AL-214\nMessage: Coolant level low\nAction: Top up to the MAX mark"
    # a whole number reads as written; a value under no header is named by its column
    assert chunks[2].text == "Code: AL-301\nMessage: Door open\ncolumn D: note\nTorque: 35"
    assert chunks[3].text == "Alarms of class F stop the spindle.\nCall maintenance for class F."


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "a word file"])
def test_damaged_excel_file_is_unreadable(damage: str) -> None:
    data = {"truncated": alarm_workbook()[:2000], "not a zip": b"Code,Message\nA1,x\n",
            "a word file": manual_docx()}[damage]
    with pytest.raises(UnreadableError, match="not a readable Excel workbook"):
        read_document(Path("alarms.xlsx"), data, KnowledgeConfig())


# --- HTML ----------------------------------------------------------------------------------------------------------

SAFETY_PAGE = """<!DOCTYPE html>
<html><head><title>Safety sheet</title><style>h1 { color: red }</style>
<script>var tracking = "do not index";</script></head>
<body>
<nav><a href="/">Intranet home</a></nav>
<p>Issued by the safety officer.</p>
<h1>KD-180 safety sheet</h1>
<h2>Before maintenance</h2>
<p>Lock out the machine before <em>any</em> work inside the guard.</p>
<ol>
  <li>Switch the main switch <b>OFF</b>.</li>
  <li>Lock it with your own padlock &amp; tag.
    <ul><li>one padlock per person</li></ul></li>
  <li>Check that the spindle cannot start.</li>
</ol>
<h2>Protective equipment</h2>
<table>
  <thead><tr><th>Task</th><th>PPE</th></tr></thead>
  <tbody><tr><td>Operating</td><td>Safety glasses, safety shoes</td></tr>
  <tr><td>Handling chips</td><td>Cut-resistant gloves<br>Safety glasses</td></tr></tbody>
</table>
</body></html>
"""


def test_html_headings_lists_and_tables() -> None:
    chunks = read_document(Path("safety.html"), SAFETY_PAGE.encode(), KnowledgeConfig()).chunks
    assert [(c.location, c.kind) for c in chunks] == [
        ("lines 6-6", "text"),
        ("section KD-180 safety sheet > Before maintenance", "section"),
        ("section KD-180 safety sheet > Protective equipment", "section"),  # its heading, before its table
        ("table 1 row 2 in section KD-180 safety sheet > Protective equipment", "row"),
        ("table 1 row 3 in section KD-180 safety sheet > Protective equipment", "row"),
    ]
    assert chunks[0].text == "Issued by the safety officer."
    assert chunks[1].text == ("KD-180 safety sheet > Before maintenance\n"
                              "Lock out the machine before any work inside the guard.\n\n"
                              "1. Switch the main switch OFF.\n"
                              "2. Lock it with your own padlock & tag.\n"
                              "  - one padlock per person\n"
                              "3. Check that the spindle cannot start.")
    assert chunks[2].text == "KD-180 safety sheet > Protective equipment"
    assert chunks[4].text == "Task: Handling chips\nPPE: Cut-resistant gloves Safety glasses"
    # the head's title, its style and script, and the site's menu are not the page's content
    assert not any(re.search(r"tracking|color|^Safety sheet|Intranet home", c.text) for c in chunks)


def test_html_in_a_declared_legacy_charset() -> None:
    page = ('<html><head><meta charset="windows-1252"></head>'
            '<body><h1>Kühlmittel</h1><p>6 % \u2013 8 % (\u00e9mulsion)</p></body></html>')
    chunks = read_document(Path("page.htm"), page.encode("cp1252"), KnowledgeConfig()).chunks
    assert [c.text for c in chunks] == ["Kühlmittel\n6 % \u2013 8 % (\u00e9mulsion)"]
    with pytest.raises(UnreadableError, match="not UTF-8"):
        read_document(Path("page.html"), "<p>Kühlmittel</p>".encode("cp1252"), KnowledgeConfig())


# --- plain text, Markdown, files -----------------------------------------------------------------------------------


def long_paragraph(length: int) -> str:
    """A paragraph of sentences about the machine, ``length`` characters long."""
    sentence = ("Check the coolant concentration at the start of shift number {n} with the refractometer, "
                "and write the reading in the log next to the machine. ")
    text = "".join(sentence.format(n=n) for n in range(length // 100 + 1))
    return text[:length].rsplit(" ", 1)[0] + "."


def test_a_long_text_paragraph_is_split_into_parts_not_cut() -> None:
    paragraph = long_paragraph(9379)
    parsed = read_text(f"Coolant log\n\n{paragraph}\n\nEnd of the log.\n", 1200)
    parts = [c for c in parsed.chunks if c.location.startswith("lines 3-3")]
    assert len(parts) >= 8  # 9,379 characters in parts of at most 1,200
    assert [c.location for c in parts] == [f"lines 3-3 (part {i})" for i in range(1, len(parts) + 1)]
    assert all(len(c.text) <= 1200 and c.text.endswith(".") for c in parts)  # whole sentences
    assert " ".join(c.text for c in parts) == paragraph
    assert parsed.chunks[-1].text == "End of the log."


def test_a_heading_with_nothing_under_it_is_kept() -> None:
    parsed = read_markdown("# Manual\n## Spare parts: see the list on the door\n## Air\nSix bar.\n", 1200)
    assert [c.text for c in parsed.chunks] == ["Manual > Spare parts: see the list on the door",
                                               "Manual > Air\nSix bar."]


def test_hash_lines_in_fenced_code_are_not_headings() -> None:
    parsed = read_markdown("# Setup\n```\n# G-code comment\nG0 X0\n```\n", 1200)
    assert [c.location for c in parsed.chunks] == ["section Setup"]


def test_find_documents_takes_the_new_kinds_and_skips_office_lock_files(tmp_path: Path) -> None:
    for name in ["manual.docx", "alarms.xlsx", "safety.html", "page.htm", "~$manual.docx", "notes.odt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [name for _, name in find_documents([str(tmp_path)])] == [
        "alarms.xlsx", "manual.docx", "page.htm", "safety.html"]


# --- no text lost, for any input -----------------------------------------------------------------------------------

MAX_CHARS = 200
SHORT_WORD = st.text("abcdefghijklmnopqrstuvwxyzKLMNO0123456789éßø", min_size=1, max_size=12)
LONG_WORD = st.builds(str.__mul__, st.sampled_from("xyz"), st.integers(MAX_CHARS, MAX_CHARS + 60))
WORD = st.one_of(*[SHORT_WORD] * 15, LONG_WORD)  # now and then a word longer than a part
SENTENCE = st.builds(lambda ws, end: " ".join(ws) + end, st.lists(WORD, min_size=1, max_size=25),
                     st.sampled_from([".", "!", "?", ",", ":", ";", "", " e.g."]))
PARAGRAPH = st.builds(lambda ss, seps: "".join(s + sep for s, sep in zip(ss, seps, strict=False)).strip(),
                      st.lists(SENTENCE, min_size=1, max_size=10), st.lists(st.sampled_from([" ", "\n"]),
                                                                            min_size=10, max_size=10))
CELL = st.builds(" ".join, st.lists(st.text("abcdefgh0123", min_size=1, max_size=8), min_size=1, max_size=6))
TABLE = st.integers(2, 4).flatmap(lambda width: st.lists(st.lists(CELL, min_size=width, max_size=width),
                                                         min_size=2, max_size=5))
BLOCK = st.one_of(
    st.tuples(st.just("heading"), st.integers(1, 3), st.builds(" ".join, st.lists(WORD, min_size=1, max_size=5))),
    st.tuples(st.just("paragraph"), st.just(0), PARAGRAPH),
    st.tuples(st.just("numbered"), st.just(0), SENTENCE),
    st.tuples(st.just("bullet"), st.just(0), SENTENCE),
    st.tuples(st.just("table"), st.just(0), TABLE),
)
DOCUMENT = st.lists(BLOCK, min_size=1, max_size=8)
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def expected_words(blocks: Sequence[tuple[str, int, Any]]) -> list[str]:
    """The words a reader must keep, in order: all text, and every table cell below the header row (the header's
    words stand before each row's values as field names)."""
    out: list[str] = []
    for kind, _, content in blocks:
        out += [w for row in content[1:] for cell in row for w in words(cell)] if kind == "table" else words(content)
    return out


def chunk_words(chunks: Iterable[Chunk]) -> list[str]:
    return words(" ".join(c.text for c in chunks))


@PROPERTY
@given(text=st.builds("\n".join, st.lists(PARAGRAPH, max_size=6)), max_chars=st.integers(1, 300))
def test_split_keeps_every_word_in_order_within_the_size(text: str, max_chars: int) -> None:
    parts = _split(text, max_chars)
    assert " ".join(parts).split() == text.split()
    assert all(len(p) <= max_chars or len(p.split()) == 1 for p in parts)


@PROPERTY
@given(paragraphs=st.lists(PARAGRAPH, min_size=1, max_size=5))
def test_text_reader_keeps_every_word(paragraphs: list[str]) -> None:
    text = "\n\n".join(paragraphs)
    assert chunk_words(read_text(text, MAX_CHARS).chunks) == words(text)


@PROPERTY
@given(blocks=DOCUMENT)
def test_markdown_reader_keeps_every_word(blocks: list[tuple[str, int, Any]]) -> None:
    lines = []
    for kind, level, content in blocks:
        if kind == "table":
            lines += ["", *("| " + " | ".join(row) + " |" for row in content), ""]
        else:
            prefix = {"heading": "#" * level + " ", "numbered": "1. ", "bullet": "- "}.get(kind, "")
            lines += [prefix + content, ""] if kind in ("heading", "paragraph") else [prefix + content]
    text = "\n".join(lines)
    assert in_order(words(text), chunk_words(read_markdown(text, MAX_CHARS).chunks))


@PROPERTY
@given(blocks=DOCUMENT)
def test_word_reader_keeps_every_word(blocks: list[tuple[str, int, Any]]) -> None:
    document = docx.Document()
    for kind, level, content in blocks:
        if kind == "heading":
            document.add_heading(content, level)
        elif kind == "table":
            add_table(document, content)
        else:
            document.add_paragraph(content, style={"numbered": "List Number", "bullet": "List Bullet"}.get(kind))
    chunks = read_docx(docx_bytes(document), MAX_CHARS, ID_COLUMNS).chunks
    assert in_order(expected_words(blocks), chunk_words(chunks))


@PROPERTY
@given(blocks=DOCUMENT)
def test_html_reader_keeps_every_word(blocks: list[tuple[str, int, Any]]) -> None:
    parts = ["<html><body>"]
    for kind, level, content in blocks:
        if kind == "table":
            cells = [[f"<{'th' if r == 0 else 'td'}>{html.escape(c)}</{'th' if r == 0 else 'td'}>" for c in row]
                     for r, row in enumerate(content)]
            parts.append("<table>" + "".join(f"<tr>{''.join(row)}</tr>" for row in cells) + "</table>")
        elif kind == "heading":
            parts.append(f"<h{level}>{html.escape(content)}</h{level}>")
        elif kind == "paragraph":
            parts.append("<p>" + html.escape(content).replace("\n", "<br>\n") + "</p>")
        else:
            parts.append(f"<{'ol' if kind == 'numbered' else 'ul'}><li>{html.escape(content)}</li>"
                         f"</{'ol' if kind == 'numbered' else 'ul'}>")
    chunks = read_html("\n".join(parts) + "</body></html>", MAX_CHARS, ID_COLUMNS).chunks
    assert in_order(expected_words(blocks), chunk_words(chunks))


@PROPERTY
@given(table=TABLE)
def test_csv_and_excel_readers_keep_every_value(table: list[list[str]]) -> None:
    header = [f"field {i}" for i in range(len(table[0]))]
    out = io.StringIO()
    csv.writer(out).writerows([header, *table])
    values = expected_words([("table", 0, [header, *table])])
    assert in_order(values, chunk_words(read_csv(out.getvalue(), ID_COLUMNS).chunks))
    assert in_order(values, chunk_words(read_xlsx(xlsx_bytes({"Sheet": [header, *table]}), MAX_CHARS,
                                                  ID_COLUMNS).chunks))



# --- the example documents that scripts/start answers from -----------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_documents_are_what_scripts_start_answers_from() -> None:
    config = load_config(ROOT / "examples" / "start.toml")
    named = [ROOT / p for p in config.knowledge.paths]
    bundled = sorted(p for p in (ROOT / "examples" / "documents").iterdir() if p.name != "README.md")
    assert sorted(named) == bundled  # every example document, and not the folder's README
    chunks = {p.name: read_document(p, p.read_bytes(), config.knowledge).chunks for p in named}
    assert all(chunks.values())
    # a procedure whose first step is the lock-out, then steps with quantities
    coolant = next(c for c in chunks["maintenance_manual.md"] if c.location.endswith("4.1 Changing the coolant"))
    steps = [line for line in coolant.text.splitlines() if re.match(r"\d+\. ", line)]
    assert steps[0] == "1. Switch the main switch OFF and lock it with your own padlock (section 1)."
    assert any("85 litres" in s for s in steps)
    # an alarm found by its code, and the safety sheet's table read as rows
    assert any(c.row_id == "2014" and "COOLANT LEVEL LOW" in c.text for c in chunks["alarms.csv"])
    assert any(c.kind == "row" and c.text.startswith("Task: Removing chips\nWear: Cut-resistant gloves")
               for c in chunks["safety_sheet.html"])

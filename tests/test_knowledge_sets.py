"""The labelled document sets themselves: their documents build as the formats they stand for, and their questions
are well formed, split by the rule their SOURCE.md states, with facts the cited document really holds.

Failures name a set and a row number, never a question or a fact: held-out questions are not to be read.
"""

from __future__ import annotations

import hashlib
import html.parser
from pathlib import Path

import pytest
from pypdf import PdfReader

from knowledgekit import SETS, built_sources, make_documents, questions

LATER = ["hm220", "fc24", "ksb25", "rc60", "pb13", "sc75", "ov30"]
"""The sets written with operator phrasing and a ``dev``/``holdout`` split by hash."""


def norm(text: str) -> str:
    return " ".join(text.lower().split())


class _Visible(html.parser.HTMLParser):
    """The text a browser shows of a page: no markup, scripts or styles."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hidden += tag in ("script", "style")
        self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("script", "style")
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def document_text(path: Path) -> str:
    """A built document's text as a reader of its format gets it: Word paragraphs and table cells, Excel cells,
    PDF pages, a page's visible text, or the file itself."""
    if path.suffix == ".docx":
        docx = pytest.importorskip("docx")
        document = docx.Document(str(path))
        cells = [c.text for t in document.tables for row in t.rows for c in row.cells]
        return "\n".join([p.text for p in document.paragraphs] + cells)
    if path.suffix == ".xlsx":
        openpyxl = pytest.importorskip("openpyxl")
        sheet = openpyxl.load_workbook(path).active
        return "\n".join(" ".join(str(v) for v in row if v is not None) for row in sheet.iter_rows(values_only=True))
    if path.suffix == ".pdf":
        return "\n".join(page.extract_text() for page in PdfReader(path).pages)
    if path.suffix == ".html":
        parser = _Visible()
        parser.feed(path.read_text())
        return "".join(parser.parts)
    return path.read_text()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("docx")
    pytest.importorskip("openpyxl")
    root = tmp_path_factory.mktemp("sets")
    return {name: make_documents(root / name, data) for name, data in SETS.items()}


def test_every_set_is_registered_with_its_questions() -> None:
    assert set(LATER) <= set(SETS)
    for name in SETS:
        assert questions(SETS[name]), name


@pytest.mark.parametrize("name", LATER)
def test_later_sets_rows_are_complete_and_split_by_the_hash_of_their_text(name: str) -> None:
    rows = questions(SETS[name])
    bad_fields, bad_split = [], []
    for n, q in enumerate(rows, 1):
        keys = {"question", "answerable", "phrasing", "split"} | ({"facts", "source"} if q["answerable"] else set())
        if set(q) != keys or q["phrasing"] not in ("operator", "document") or (q["answerable"] and not q["facts"]):
            bad_fields.append(n)
        want = "holdout" if hashlib.sha256(q["question"].encode("utf-8")).digest()[0] < 128 else "dev"
        if q["split"] != want:
            bad_split.append(n)
    assert bad_fields == [] and bad_split == []
    assert len({q["question"] for q in rows}) == len(rows)
    answerable = [q for q in rows if q["answerable"]]
    assert len(answerable) >= 35 and len(rows) - len(answerable) >= 12
    assert sum(q["phrasing"] == "operator" for q in answerable) * 2 >= len(answerable)
    assert "first byte of SHA-256" in (SETS[name] / "SOURCE.md").read_text()


@pytest.mark.parametrize("name", LATER)
def test_later_sets_facts_are_in_the_document_they_cite(name: str, built: dict[str, Path]) -> None:
    texts = {f.name: norm(document_text(f)) for f in built[name].iterdir()}
    missing_source, missing_fact = [], []
    for n, q in enumerate(questions(SETS[name]), 1):
        if not q["answerable"]:
            continue
        if q["source"] not in texts:
            missing_source.append(n)
        elif not all(norm(f) in texts[q["source"]] for f in q["facts"]):
            missing_fact.append(n)
    assert missing_source == [] and missing_fact == []


def test_later_sets_cover_every_format_the_daemon_reads(built: dict[str, Path]) -> None:
    suffixes = {f.suffix for name in LATER for f in built[name].iterdir()}
    assert suffixes == {".csv", ".md", ".txt", ".pdf", ".docx", ".xlsx", ".html"}
    semicolons = [f for name in LATER for f in built[name].glob("*.csv") if ";" in f.read_text().splitlines()[0]]
    assert semicolons


def test_word_document_keeps_headings_tables_and_restarts_each_procedure_at_one(built: dict[str, Path]) -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document(str(built["hm220"] / "maintenance_manual.docx"))
    styles = [p.style.name for p in document.paragraphs if p.style is not None]
    assert {"Heading 1", "Heading 2", "Heading 3", "List Number", "Normal"} <= set(styles)
    assert document.tables and document.tables[0].rows[0].cells[0].paragraphs[0].runs[0].bold
    # each numbered procedure has its own list, and each list starts at 1 (as Word shows "1." again)
    numbering = document.part.numbering_part.element
    lists: list[int] = []
    for p in document.paragraphs:
        if p.style is not None and p.style.name == "List Number":
            num_id = p._p.pPr.numPr.numId.val
            if not lists or lists[-1] != num_id:
                lists.append(num_id)
    assert len(lists) == len(set(lists)) == 3  # the return filter, the oil change, a heater band
    for num_id in lists:
        start = numbering.num_having_numId(num_id).xpath("./w:lvlOverride/w:startOverride/@w:val")
        assert start == ["1"]
    assert document.core_properties.created.year == 2024  # the same bytes on every build, not today's date


def test_excel_alarm_list_has_one_row_per_alarm_under_a_header(built: dict[str, Path]) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    source = SETS["hm220"] / "alarms.xlsx.csv"
    lines = source.read_text().splitlines()
    sheet = openpyxl.load_workbook(built["hm220"] / "alarms.xlsx").active
    rows = list(sheet.iter_rows(values_only=True))
    assert [str(v) for v in rows[0]] == lines[0].split(",")
    assert all(c.font.bold for c in sheet[1])
    assert len(rows) == len(lines)
    assert all(isinstance(r[0], str) and r[0].startswith("E-") for r in rows[1:])


def test_built_documents_are_named_after_their_sources() -> None:
    names = {name for _, name, _ in built_sources(SETS["ksb25"])}
    assert names == {"service_manual.docx"}
    names = {name for _, name, _ in built_sources(SETS["hm220"])}
    assert names == {"alarms.xlsx", "maintenance_manual.docx", "safety_sheet.pdf"}
    assert {name for _, name, _ in built_sources(SETS["vmc850"])} == {"safety.pdf"}


def test_html_pages_have_a_table_and_a_procedure_in_an_ordered_list() -> None:
    for name in LATER:
        for page in (SETS[name] / "docs").glob("*.html"):
            text = page.read_text()
            assert "<table" in text and "<ol>" in text and "<script" in text, page.name

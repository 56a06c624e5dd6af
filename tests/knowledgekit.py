"""Test helpers for the plant's documents: a small PDF writer and the fictional machines' document sets.

``tests/data/knowledge`` is a fictional Brennholt VMC-850 machining centre: an alarm table (CSV), a maintenance
manual (Markdown) and a safety sheet, written here as a PDF with one page per section. ``tests/data/knowledge_pl40``
is a fictional Kestrel PL-40 palletising cell: a fault list (CSV, semicolons), a changeover guide (Markdown) and an
operating manual (PDF). Three later sets add Word, Excel and HTML documents: an injection moulding machine
(``knowledge_hm220``), a bottle filling and capping monobloc (``knowledge_fc24``) and a steam boiler
(``knowledge_ksb25``); two more, a water-cooled chiller (``knowledge_rc60``) and a hydraulic press brake
(``knowledge_pb13``), add a plain text document; and two more, a screw air compressor station with its dryer and
receiver (``knowledge_sc75``) and a gas-fired powder curing oven (``knowledge_ov30``), are written the same way.
A set's binary documents are kept as text sources beside ``docs/`` and built by ``make_documents``:
``NAME.pdf.txt``, ``NAME.docx.md`` and ``NAME.xlsx.csv`` become ``NAME.pdf``, ``NAME.docx`` and ``NAME.xlsx``.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "knowledge"


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def write_pdf(pages: list[list[str]], path: Path) -> Path:
    """A PDF with one page per list of lines (Helvetica, WinAnsi): text a PDF reader extracts as written."""
    objects: list[bytes] = []

    def add(body: str | bytes) -> int:
        objects.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(objects)

    font = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    pages_id = len(objects) + 1 + 2 * len(pages)  # the Pages object comes after every page and content stream
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 10 Tf", "13 TL", "50 790 Td"]
        ops += [f"{_pdf_string(line)} Tj T*" for line in lines]
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        kids.append(add(f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 595 842] "
                        f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content} 0 R >>"))
    assert add(f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>") == pages_id
    catalog = add(f"<< /Type /Catalog /Pages {pages_id} 0 R >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref)
    path.write_bytes(bytes(out))
    return path


SETS = {"vmc850": DATA, "pl40": DATA.parent / "knowledge_pl40", "hm220": DATA.parent / "knowledge_hm220",
        "fc24": DATA.parent / "knowledge_fc24", "ksb25": DATA.parent / "knowledge_ksb25",
        "rc60": DATA.parent / "knowledge_rc60", "pb13": DATA.parent / "knowledge_pb13",
        "sc75": DATA.parent / "knowledge_sc75", "ov30": DATA.parent / "knowledge_ov30"}
"""The labelled document sets: the machining centre (the first, with the daemon's own tests), and a palletising
cell written later, after the first set's tuning, to see how the settings carry over to documents they were not
chosen on; then an injection moulding machine, a bottle filler and capper and a steam boiler, whose documents
include Word, Excel and HTML and whose questions are partly in an operator's own words (``phrasing``); and four more
written the same way on kinds of machine none of the others is: a water-cooled chiller, a press brake, a screw air
compressor with its dryer and receiver, and a gas-fired curing oven."""
PDF_SOURCES = {"safety_sheet.txt": "safety.pdf", "operating_manual.txt": "operating_manual.pdf"}
"""Text files of the first two sets written as PDFs, one page per ``\\f`` line (later sets name theirs
``NAME.pdf.txt``)."""
FIXED_TIME = datetime.datetime(2024, 3, 1, 8, 0, 0)
"""The creation time written into built Word and Excel files, so that a set's files are the same on every build."""


def pdf_pages(source: Path) -> list[list[str]]:
    """A PDF's pages from its source text (``\\f`` lines separate them)."""
    text = source.read_text()
    return [[line for line in page.strip("\n").splitlines()] for page in text.split("\\f\n")]


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """A Word document's source as blocks: ``("h1".."h3", [text])``, ``("p", [text])``, ``("ol", items)``,
    ``("ul", items)`` and ``("table", rows)``; a paragraph's or list item's continuation lines are joined to it."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        kind = blocks[-1][0] if blocks else ""
        heading = re.match(r"(#{1,3})\s+(.*)", stripped)
        numbered = re.match(r"\d+\.\s+(.*)", stripped)
        if not stripped:
            blocks.append(("", []))
        elif heading:
            blocks.append((f"h{len(heading.group(1))}", [heading.group(2)]))
        elif stripped.startswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            if kind != "table":
                blocks.append(("table", []))
            blocks[-1][1].append("\t".join(cells))
        elif numbered or stripped.startswith("- "):
            want = "ol" if numbered else "ul"
            if kind != want:
                blocks.append((want, []))
            blocks[-1][1].append(numbered.group(1) if numbered else stripped[2:])
        elif kind in ("p", "ol", "ul"):
            blocks[-1][1][-1] += " " + stripped
        else:
            blocks.append(("p", [stripped]))
    return [b for b in blocks if b[0]]


def write_docx(source: Path, path: Path) -> Path:
    """A Word document from its Markdown-like source: ``#`` headings (levels 1-3), paragraphs, numbered lists that
    start again at 1 for each procedure, bullet lists and ``|`` tables with a bold header row."""
    import docx  # python-docx; imported here so that the other sets build without it

    document = docx.Document()
    document.core_properties.title = source.name.removesuffix(".docx.md").replace("_", " ")
    document.core_properties.author = "Maintenance department"
    document.core_properties.created = document.core_properties.modified = FIXED_TIME
    numbering = document.part.numbering_part.element
    style_num = document.styles["List Number"].element.pPr.numPr.numId.val
    abstract = numbering.num_having_numId(style_num).abstractNumId.val
    for kind, items in _blocks(source.read_text()):
        if kind.startswith("h"):
            document.add_heading(items[0], level=int(kind[1]))
        elif kind == "p":
            document.add_paragraph(items[0])
        elif kind == "ul":
            for item in items:
                document.add_paragraph(item, style="List Bullet")
        elif kind == "ol":
            num = numbering.add_num(abstract)
            num.add_lvlOverride(ilvl=0).add_startOverride(1)
            for item in items:
                num_pr = document.add_paragraph(item, style="List Number")._p.get_or_add_pPr().get_or_add_numPr()
                num_pr.get_or_add_ilvl().val = 0
                num_pr.get_or_add_numId().val = num.numId
        else:
            rows = [item.split("\t") for item in items]
            table = document.add_table(rows=len(rows), cols=len(rows[0]))
            table.style = "Table Grid"
            for r, row in enumerate(rows):
                for c, value in enumerate(row):
                    cell = table.cell(r, c)
                    cell.text = value
                    if r == 0:
                        for run in cell.paragraphs[0].runs:
                            run.bold = True
    document.save(str(path))
    return path


def write_xlsx(source: Path, path: Path) -> Path:
    """An Excel workbook from a CSV (commas): one sheet, the first row the bold header, frozen below it; cells that
    hold a whole number without a leading zero are written as numbers, as a spreadsheet keeps them."""
    import openpyxl  # imported here so that the other sets build without it
    from openpyxl.styles import Font
    from openpyxl.utils import get_column_letter

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = source.name.removesuffix(".xlsx.csv").replace("_", " ").title()
    rows = list(csv.reader(io.StringIO(source.read_text())))
    for r, row in enumerate(rows):
        sheet.append([int(v) if r and re.fullmatch(r"[1-9]\d*", v) else v for v in row])
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    sheet.freeze_panes = "A2"
    for c, column in enumerate(zip(*rows, strict=True), 1):
        sheet.column_dimensions[get_column_letter(c)].width = min(60, max(len(v) for v in column) + 2)
    workbook.properties.creator = "Maintenance department"
    workbook.properties.created = workbook.properties.modified = FIXED_TIME
    workbook.save(str(path))
    return path


def _write_pdf_source(source: Path, path: Path) -> Path:
    return write_pdf(pdf_pages(source), path)


BUILT: dict[str, tuple[str, Callable[[Path, Path], Path]]] = {
    ".pdf.txt": (".pdf", _write_pdf_source), ".docx.md": (".docx", write_docx), ".xlsx.csv": (".xlsx", write_xlsx)}
"""Text sources beside a set's ``docs/`` (by how their name ends) and the document each becomes."""


def built_sources(data: Path) -> list[tuple[Path, str, Callable[[Path, Path], Path]]]:
    """A set's text sources, each with the name of the document it becomes (``manual.docx.md``: ``manual.docx``)
    and the function that writes that document."""
    out: list[tuple[Path, str, Callable[[Path, Path], Path]]] = [
        (data / source, name, _write_pdf_source) for source, name in PDF_SOURCES.items() if (data / source).is_file()]
    for f in sorted(data.iterdir()):
        for ending, (suffix, writer) in BUILT.items():
            if f.is_file() and f.name.endswith(ending):
                out.append((f, f.name.removesuffix(ending) + suffix, writer))
    return out


def make_documents(dest: Path, data: Path = DATA) -> Path:
    """A set's documents in ``dest`` (the machining centre's: alarms.csv, maintenance.md and safety.pdf): ``docs/``
    copied, the PDF, Word and Excel files built from their text sources."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (data / "docs").iterdir():
        shutil.copy(f, dest / f.name)
    for source, name, writer in built_sources(data):
        writer(source, dest / name)
    return dest


def corpus(data: Path = DATA) -> str:
    """Every document's text of a set, for judging whether an answer states anything none of them holds (the text
    sources of its PDF, Word and Excel files; HTML with its markup)."""
    files = [*sorted((data / "docs").iterdir()), *(source for source, _, _ in built_sources(data))]
    return "\n".join(f.read_text() for f in files)


def questions(data: Path = DATA) -> list[dict[str, Any]]:
    """The labelled questions: ``split`` is ``holdout`` or, for tuning, ``tune`` (the first two sets) or ``dev``
    (the later ones), fixed before anything ran on them; the later sets' rows also say whether the question is in
    the documents' words or an operator's (``phrasing``: ``document`` or ``operator``)."""
    return [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines() if line.strip()]

"""Test helpers for the plant's documents: a small PDF writer and the fictional machines' document sets.

``tests/data/knowledge`` is a fictional Brennholt VMC-850 machining centre: an alarm table (CSV), a maintenance
manual (Markdown) and a safety sheet, written here as a PDF with one page per section. ``tests/data/knowledge_pl40``
is a fictional Kestrel PL-40 palletising cell: a fault list (CSV, semicolons), a changeover guide (Markdown) and an
operating manual (PDF).
"""

from __future__ import annotations

import json
import shutil
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


SETS = {"vmc850": DATA, "pl40": DATA.parent / "knowledge_pl40"}
"""The labelled document sets: the machining centre (the first, with the daemon's own tests), and a palletising
cell written later, after the first set's tuning, to see how the settings carry over to documents they were not
chosen on."""
PDF_SOURCES = {"safety_sheet.txt": "safety.pdf", "operating_manual.txt": "operating_manual.pdf"}
"""Text files of a set written as PDFs, one page per ``\\f`` line."""


def pdf_pages(source: Path) -> list[list[str]]:
    """A PDF's pages from its source text (``\\f`` lines separate them)."""
    text = source.read_text()
    return [[line for line in page.strip("\n").splitlines()] for page in text.split("\\f\n")]


def make_documents(dest: Path, data: Path = DATA) -> Path:
    """A set's documents in ``dest`` (the machining centre's: alarms.csv, maintenance.md and safety.pdf)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (data / "docs").iterdir():
        shutil.copy(f, dest / f.name)
    for source, name in PDF_SOURCES.items():
        if (data / source).is_file():
            write_pdf(pdf_pages(data / source), dest / name)
    return dest


def corpus(data: Path = DATA) -> str:
    """Every document's text of a set, for judging whether an answer states anything none of them holds."""
    files = [*sorted((data / "docs").iterdir()), *(data / s for s in PDF_SOURCES if (data / s).is_file())]
    return "\n".join(f.read_text() for f in files)


def questions(data: Path = DATA) -> list[dict[str, Any]]:
    """The labelled questions: ``split`` is ``tune`` or ``holdout`` (fixed before any tuning)."""
    return [json.loads(line) for line in (data / "questions.jsonl").read_text().splitlines() if line.strip()]

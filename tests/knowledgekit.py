"""Test helpers for the plant's documents: a small PDF writer and the fictional machine's document set.

The document set (``tests/data/knowledge``) is a fictional Brennholt VMC-850 machining centre: an alarm table
(CSV), a maintenance manual (Markdown) and a safety sheet, written here as a PDF with one page per section.
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


def safety_pages() -> list[list[str]]:
    """The safety sheet's pages (``\\f`` lines separate them in the source text)."""
    text = (DATA / "safety_sheet.txt").read_text()
    return [[line for line in page.strip("\n").splitlines()] for page in text.split("\\f\n")]


def make_documents(dest: Path) -> Path:
    """The fictional machine's documents in ``dest``: alarms.csv, maintenance.md and safety.pdf."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in (DATA / "docs").iterdir():
        shutil.copy(f, dest / f.name)
    write_pdf(safety_pages(), dest / "safety.pdf")
    return dest


def questions() -> list[dict[str, Any]]:
    """The labelled questions: ``split`` is ``tune`` or ``holdout`` (fixed before any tuning)."""
    return [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]

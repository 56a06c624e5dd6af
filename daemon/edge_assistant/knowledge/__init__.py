"""The plant's own documents: read (``readers``), indexed in SQLite with sentence vectors (``index``), retrieved per
question by words and meaning (``retrieve``), and answered in their own words with citations (``answer``)."""

from .answer import Choice, answer_from_row, choose, sources_of
from .identifiers import designations, identifiers_in, names_a_sibling, normalize_id
from .index import DocumentInfo, Embedder, IndexReport, build_index
from .readers import UnreadableError, find_documents, read_csv, read_document, read_markdown, read_pdf, read_text
from .retrieve import Found, Retriever
from .units import Unit, row_text, units_of

__all__ = [
    "Choice", "DocumentInfo", "Embedder", "Found", "IndexReport", "Retriever", "Unit", "UnreadableError",
    "answer_from_row", "build_index", "choose", "designations", "find_documents", "identifiers_in", "names_a_sibling",
    "normalize_id", "read_csv",
    "read_document", "read_markdown", "read_pdf", "read_text", "row_text", "sources_of", "units_of",
]

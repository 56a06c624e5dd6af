"""The plant's own documents: read (``readers``), indexed in SQLite (``index``), retrieved per question
(``retrieve``) and quoted with their citations (``answer``)."""

from .answer import answer_from_row, answer_kind, quote_answer, row_text, sentences_of, sources_of
from .identifiers import identifiers_in, normalize_id, question_phrases, question_words
from .index import IndexReport, build_index
from .readers import UnreadableError, find_documents, read_csv, read_document, read_markdown, read_pdf, read_text
from .retrieve import DocumentInfo, Retriever

__all__ = [
    "DocumentInfo", "IndexReport", "Retriever", "UnreadableError", "answer_from_row", "answer_kind", "build_index",
    "find_documents", "identifiers_in", "normalize_id", "question_phrases", "question_words", "quote_answer",
    "read_csv", "read_document", "read_markdown", "read_pdf", "read_text", "row_text", "sentences_of", "sources_of",
]

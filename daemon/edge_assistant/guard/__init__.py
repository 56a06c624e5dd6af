"""The topic guard: input rules, a relevance check with a model on the device, and an output check.

Each layer returns a ``Verdict``; the first refusal wins and names its layer and a reason code.

- ``rules``: pure checks of a text's form, with no model: a request's chat-template markers, encoded or invisible
  payloads, language and blocked subjects; the tasks a request joins; an answer's role markers,
  blocked subjects and stretches of the system prompt.
- ``relevance``: whether a request belongs to the persona's domain, by a classifier over sentence embeddings
  trained on labelled examples (``classifier``, ``corpus/``), or a yes/no question to the loaded model; whether a
  sentence of an answer does, by the nearest of the persona's examples.
- ``answer_gate``: the output check as an answer streams (``AnswerGate``): fed piece by piece, it releases only what
  passed the rules and, sentence by sentence, the relevance layer.

Imports run one way: ``answer_gate`` uses ``relevance`` and ``rules``, ``relevance`` uses ``rules``, never the
reverse.
"""

from .answer_gate import AnswerGate
from .relevance import (
    MARGINS,
    Chooser,
    Embedder,
    Margins,
    Relevance,
    ask_yes_no,
    content_words,
    judge,
    keyword_hit,
)
from .rules import (
    ALLOW,
    ENGLISH,
    FORMAT_PAYLOAD,
    LABELLED,
    OTHER_LANGUAGES,
    ROLE_MARKERS,
    TASK_JOINS,
    GuardConfig,
    Strictness,
    Verdict,
    check_input,
    check_output,
    encoded_payload,
    language_of,
    neutralize_markers,
    request_parts,
    split_request,
)

__all__ = [
    "ALLOW",
    "ENGLISH",
    "FORMAT_PAYLOAD",
    "LABELLED",
    "MARGINS",
    "OTHER_LANGUAGES",
    "ROLE_MARKERS",
    "TASK_JOINS",
    "AnswerGate",
    "Chooser",
    "Embedder",
    "GuardConfig",
    "Margins",
    "Relevance",
    "Strictness",
    "Verdict",
    "ask_yes_no",
    "check_input",
    "check_output",
    "content_words",
    "encoded_payload",
    "judge",
    "keyword_hit",
    "language_of",
    "neutralize_markers",
    "request_parts",
    "split_request",
]

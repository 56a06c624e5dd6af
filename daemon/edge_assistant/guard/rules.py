"""The guard's rules: pure checks of a request's and an answer's text, with no model.

On the input side, signals of a text's form only: chat-template role markers, encoded payloads that decode to
words, invisible characters, words mixing scripts, the persona's languages and its blocked subjects (``check_input``;
what a request asks for is the relevance classifier's to judge); the splitting of a request into the
tasks it joins (``split_request``); on the output side, role markers, blocked subjects and stretches of the system
prompt (``check_output``). Each check returns a ``Verdict``.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

Strictness = Literal["off", "low", "medium", "high"]


# Chat-template syntax: the special tokens and turn headers of the chat formats small models are trained on
# (ChatML and Llama 3 ``<|...|>`` tokens, Llama 2 ``[INST]``/``<<SYS>>``, ``<s>``, Alpaca ``### Instruction``
# headers) and a line that opens a system or assistant turn as transcripts write it. In user text they can only be
# an attempt to open a new turn; no word alone is one ("Developer: ..." or "admin password" are not).
ROLE_MARKERS = re.compile(
    r"<\|[a-z_]{2,20}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|^\s*#{2,}\s*(instruction|system|response)\b|"
    r"^\s*(system|assistant)\s*:", re.IGNORECASE | re.MULTILINE)

# The following three split a request into the tasks it joins; they refuse nothing: each part is judged by the
# relevance layer on its own.
# Words that join a second task to the first.
TASK_JOINS = re.compile(
    r"(?:[,.;!?]?\s+)(?:and\s+then|and\s+also|then|after\s+that|afterwards|also|additionally|plus|p\.\s?s\.)"
    r"[,:]?\s+|\s*;\s+", re.IGNORECASE)
# A short label before a colon ("Machine alarm 77: ...", "Answer in JSON: ...") and what follows it.
LABELLED = re.compile(r"^\s*([^:\n]{2,40}):\s+(.+)$", re.DOTALL)
# Content smuggled in an answer format: inside braces, or after "as a table/JSON/YAML".
FORMAT_PAYLOAD = re.compile(r"\{([^{}]{8,})\}|\b(?:json|yaml|xml|csv|table|list)\b[^.?!\n]{0,20}?"
                            r"(?:with|of|about|for|=|:)\s+(.{8,})", re.IGNORECASE)

def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


ENGLISH = _words("the a an is are was were be to of and in on for with what how why when where which who do does "
                    "did can should i my it this that please")
OTHER_LANGUAGES: dict[str, frozenset[str]] = {
    "de": _words("der die das und ist nicht ich wie was wird ein eine mit für auf den dem des zu sie es bitte "
                    "morgen wo warum"),
    "fr": _words("le la les et est une un des du pour pas je que qui dans sur avec vous il elle ce cette "
                    "comment où"),
    "es": _words("el la los las y es una un de del que en por para con no yo como qué dónde cuéntame esta "
                    "este"),
    "it": _words("il lo la gli le e è una uno di del che per con non sono come dove questo questa"),
    "pt": _words("o a os as e é um uma de do da que em para com não eu como onde este esta"),
    "nl": _words("de het een en is van dat niet ik hoe wat waar met voor op zijn"),
}


def language_of(text: str) -> str:
    """A rough guess: ``en``, one of ``OTHER_LANGUAGES``, ``other`` (another script) or ``""`` (cannot tell).

    The property: the language whose most common words a text uses most (two at least), or a script other than
    the Latin one for most of its letters."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return ""
    latin = sum(1 for ch in letters if "LATIN" in unicodedata.name(ch, ""))
    if latin < 0.6 * len(letters):
        return "other"
    words = re.findall(r"[^\W\d_]+", text.lower())
    if len(words) < 3:
        return ""
    scores = {"en": sum(w in ENGLISH for w in words)}
    scores |= {lang: sum(w in stop for w in words) for lang, stop in OTHER_LANGUAGES.items()}
    best = max(scores, key=lambda k: scores[k])
    if scores[best] < 2 or (best != "en" and scores[best] <= scores["en"]):
        return "en" if scores["en"] >= 1 else ""
    return best


def _reads_as_text(raw: bytes) -> bool:
    """Whether decoded bytes read as words: eight bytes or more, nearly all printable ASCII, a word of two letters
    or more followed by a space and another word. A register dump or a key decodes to no such thing."""
    return (len(raw) >= 8 and sum(32 <= b < 127 for b in raw) >= 0.95 * len(raw)
            and re.search(rb"[A-Za-z]{2,} [A-Za-z]", raw) is not None)


INVISIBLE = re.compile("[\U000E0000-\U000E007F\u202A-\u202E\u2066-\u2069]|"
                       "(?<=\\w)[\u200B\u2060\uFEFF](?=\\w)")
"""Characters that change what a model reads but not what a person sees: Unicode tag characters (an invisible
copy of ASCII), bidirectional overrides and isolates, and a zero-width space, word joiner or byte-order mark inside
a word (the zero-width joiner and non-joiner are left alone: scripts such as Persian and Devanagari use them)."""


def encoded_payload(text: str) -> str:
    """What kind of encoded or disguised text ``text`` carries (``""`` for none): text a model may decode and
    obey that a reader (or a check of the visible words) does not see.

    Each kind is a property of the text's form, never of its words: base64, hex escapes, unicode escapes and
    runs of hex bytes that decode to words (``_reads_as_text``); UTF-7; invisible characters (``INVISIBLE``);
    letters of two scripts, or letters dressed as symbols, within one word (homoglyphs)."""
    for m in re.finditer(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        token = m.group(0)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if _reads_as_text(raw):
            return "base64"
    escapes = re.findall(r"\\x([0-9a-fA-F]{2})", text)
    if len(escapes) >= 4 and _reads_as_text(bytes.fromhex("".join(escapes))):
        return "hex escapes"
    units = re.findall(r"\\u\{?([0-9a-fA-F]{4})\}?", text)
    if len(units) >= 4 and _reads_as_text("".join(chr(int(u, 16)) for u in units).encode("utf-8", "replace")):
        return "unicode escapes"
    if re.search(r"\+AD[A-Za-z0-9]{1,6}-", text):  # UTF-7's base64 runs for ASCII punctuation: no one types them
        return "UTF-7"
    for run in re.finditer(r"(?:\b[0-9a-fA-F]{2}\b[ \t:,-]*){8,}", text):
        if _reads_as_text(bytes.fromhex("".join(re.findall(r"[0-9a-fA-F]{2}", run.group(0))))):
            return "hex bytes"
    if INVISIBLE.search(text):
        return "invisible characters"
    for word in re.findall(r"[^\W\d_]{3,}", text):
        scripts = {_script(ch) for ch in word}
        if len(scripts) > 1 and "LATIN" in scripts:
            return "mixed-script letters"
    return ""


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    if "MODIFIER LETTER" in name or "SUBSCRIPT" in name or "SUPERSCRIPT" in name or unicodedata.category(ch) == "So":
        return "DISGUISE"
    if name.startswith(("LATIN", "CYRILLIC", "GREEK", "ARMENIAN")):
        return name.split()[0]
    if name.startswith(("SCRIPT ", "BLACK-LETTER", "DOUBLE-STRUCK", "ESTIMATED")):
        return "DISGUISE"
    return "OTHER"


def split_request(text: str) -> list[str]:
    """The pieces a request joins together: split at words that add a task, after a short label and its colon,
    and around a payload in an answer format. One piece when nothing is joined."""
    out: list[str] = []
    for part in (p for p in TASK_JOINS.split(text) if p):
        m = LABELLED.match(part)
        if m and len(m.group(1).split()) <= 6:
            out += [m.group(1), m.group(2)]
        else:
            out.append(part)
    for m in FORMAT_PAYLOAD.finditer(text):
        out.append(m.group(1) or m.group(2))
    # The same piece found by two of these rules (a payload after a label's colon) is one piece.
    return list(dict.fromkeys(p for p in (" ".join(re.sub(r"[{}\"'`]", " ", x).split()) for x in out) if p))


def request_parts(text: str) -> list[str]:
    """The pieces of ``split_request`` that carry a task of their own (three words or more)."""
    return [p for p in split_request(text) if len(p.split()) >= 3]


@dataclass(frozen=True)
class GuardConfig:
    """A persona's topic restriction (``[personas.<name>.guard]``)."""

    strictness: Strictness = "medium"
    """``off`` answers everything; ``low``/``medium``/``high`` move the relevance threshold and the output check."""
    domain: str = ""
    """One sentence describing what the persona talks about."""
    allowed_subjects: tuple[str, ...] = ()
    """The domain's own terms: on-topic training examples of the relevance classifier (with ``on_topic``); words
    that mark a sentence of an answer as on topic, and a request too where no classifier judges requests
    (``relevance`` ``yesno``) (whole words, case-insensitive). Naming one never lets a request through the
    classifier: a story about the spindle names one."""
    blocked_subjects: tuple[str, ...] = ()
    """Regular expressions; a match in the request or the answer refuses."""
    on_topic: tuple[str, ...] = ()
    """Examples of requests to answer: training rows of the relevance classifier, and the answer check's
    positives."""
    off_topic: tuple[str, ...] = ()
    """Examples of requests to refuse: training rows of the relevance classifier, and the answer check's
    negatives."""
    corpus: bool = True
    """Train the relevance classifier on the shipped corpus as well (``guard/corpus``: a machining plant's
    questions in operators' words, everyday and creative requests, override and extraction attempts); false: on
    the persona's examples and the documents' sentences alone (a persona of another domain)."""
    refusal: str = "I can only help with questions about this line's machines, tools and safety."
    """The fixed refusal text: a refusal is as deterministic as an answer."""
    injection: Literal["refuse", "quote"] = "refuse"
    """``refuse`` requests that try to change the assistant's instructions; ``quote`` passes them on as data
    (the translator translates them)."""
    relevance: Literal["embedding", "yesno", "none"] = "embedding"
    """The relevance layer: a classifier over sentence embeddings trained on labelled examples
    (``guard.classifier``), a yes/no question to the loaded model constrained by a grammar, or none (see the
    measured figures in the README)."""
    vocabulary: tuple[str, ...] = ()
    """Everyday words of the domain (``machine``, ``part``, ``shift``): not enough to put a request on topic, but
    enough for a task joined to an on-topic one where no classifier judges the parts (``relevance`` ``yesno``)."""
    languages: tuple[str, ...] = ()
    """Languages the persona serves (``en``, ``de``, ``fr``, ``es``, ``it``, ``pt``, ``nl``); a request plainly in
    another is refused with the code ``language``. Empty: any."""
    answer_check: bool = True
    """Check each sentence of the answer against the domain as it streams (the relevance layer's embeddings)."""

    def __post_init__(self) -> None:
        for i, pattern in enumerate(self.blocked_subjects):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"blocked_subjects[{i}]: not a regular expression: {exc}") from exc
        if self.strictness != "off" and self.relevance == "embedding" and bool(self.on_topic) != bool(self.off_topic):
            raise ValueError("on_topic, off_topic: the relevance layer needs examples of both (or neither)")
        if not self.refusal.strip():
            raise ValueError("refusal: must not be empty")


@dataclass(frozen=True)
class Verdict:
    """What one layer decided."""

    allowed: bool
    """False refuses the request (or the answer)."""
    layer: str = ""
    """``input``, ``relevance`` or ``output``."""
    code: str = ""
    """Reason code: ``role_markers``, ``encoded``, ``language``, ``blocked_subject``, ``off_topic``,
    ``compound``, ``off_topic_answer``, ``prompt_leak``. (Attempts to override the rules or to get the
    instructions are off topic: the relevance classifier learned them from examples.)"""
    detail: str = ""
    """What matched, for the log. An output check's detail quotes nothing of the answer: an answer may repeat the
    system prompt, and the log carries no text of it."""
    score: float | None = None
    """The relevance classifier's probability of on topic (a request), or the margin (a sentence of an answer),
    where computed."""


ALLOW = Verdict(True)


def neutralize_markers(text: str) -> str:
    """User text with chat-template markers broken, so they tokenize as text, never as special tokens."""
    return ROLE_MARKERS.sub(lambda m: m.group(0).replace("<", "<\u200b").replace("[", "[\u200b")
                            .replace("#", "#\u200b").replace(":", "\u200b:"), text)


def check_input(text: str, cfg: GuardConfig) -> Verdict:
    """The cheap rules, each on a property of the text's form, never on words an operator may use: chat-template
    syntax and encoded or invisible payloads (when ``injection`` is ``refuse``), a language the persona does not
    serve, the persona's blocked subjects. What a request asks for (another topic, the instructions, another role)
    is the relevance layer's to judge."""
    if cfg.strictness == "off":
        return ALLOW
    if cfg.injection == "refuse":
        m = ROLE_MARKERS.search(text)
        if m:
            return Verdict(False, "input", "role_markers", f"chat-template marker {m.group(0).strip()!r}")
        kind = encoded_payload(text)
        if kind:
            return Verdict(False, "input", "encoded", f"carries {kind}")
    if cfg.languages:
        lang = language_of(text)
        if lang and lang not in cfg.languages:
            return Verdict(False, "input", "language", f"written in {lang}, the persona serves "
                                                       f"{', '.join(cfg.languages)}")
    for pattern in cfg.blocked_subjects:
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return Verdict(False, "input", "blocked_subject", f"blocked subject {pattern!r} matched {m.group(0)!r}")
    return ALLOW


def check_output(answer: str, cfg: GuardConfig, system_prompt: str, window: int = 40) -> Verdict:
    """Before an answer leaves: no role markers, no blocked subject, no stretch of the system prompt."""
    if cfg.strictness == "off":
        return ALLOW
    m = ROLE_MARKERS.search(answer)
    if m:
        return Verdict(False, "output", "role_markers", f"answer holds a role marker at its character {m.start()}")
    for pattern in cfg.blocked_subjects:
        if re.search(pattern, answer, re.IGNORECASE):
            return Verdict(False, "output", "blocked_subject", f"answer matches {pattern!r}")
    norm_answer = " ".join(answer.lower().split())
    norm_prompt = " ".join(system_prompt.lower().split())
    size = window if cfg.strictness != "high" else window // 2
    for start in range(0, max(1, len(norm_prompt) - size + 1), max(1, size // 4)):
        piece = norm_prompt[start:start + size]
        if len(piece) >= size and piece in norm_answer:
            return Verdict(False, "output", "prompt_leak", f"answer repeats {size} characters of the system prompt "
                                                            f"(from its character {start})")
    return ALLOW

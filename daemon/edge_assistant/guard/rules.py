"""The guard's rules: pure checks of a request's and an answer's text, with no model.

On the input side, chat-template role markers, injection, extraction and disguise markers, encoded or disguised
payloads, the persona's languages and its blocked subjects (``check_input``); the splitting of a request into the
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


# Chat-template and role markers: in user text they are an attempt to open a new turn.
ROLE_MARKERS = re.compile(
    r"<\|[a-z_]{2,20}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|^\s*#{2,}\s*(instruction|system|response)\b|"
    r"^\s*(system|assistant)\s*:|(?:^|[.!?]\s+)(system|admin|developer|root)\s*:|"
    r"\[\s*(system|admin|developer|root)\b[^\]]{0,30}\]|\|{2,}\s*system", re.IGNORECASE | re.MULTILINE)

INJECTION_MARKERS = re.compile("|".join([
    r"\b(ignore|disregard|forget|override|bypass|skip)\b[^.?!\n]{0,40}\b(instructions?|rules?|directions?|"
    r"guidelines?|prompts?|polic(y|ies)|restrictions?|filters?|above|before|everything|previous|prior|protocols?|"
    r"safety|programming|guardrails?|constraints?|ethics|directives?|commands)\b",
    r"\boverrides?\b[^.?!\n]{0,30}\b(previous|prior|earlier|all|above|security|safety)\b",
    r"\b(drop|truncate)\s+table\b|\brm\s+-rf\b|<script\b|/etc/(passwd|shadow)\b",
    r"\b(reveal|tell|give|show|list|leak|print)\b[^.?!\n]{0,25}\b(passwords?|secrets?|api\s+keys?|credentials|"
    r"access\s+keys?)\b",
    # credentials and a role given to the assistant
    r"\b(database|server|system|admin|root|user|your|login)\s+(passwords?|credentials|secrets?)\b|\blogin\s+data\b",
    r"^\W*(you\s+are|you're|act\s+like)\s+(an?|the)\s+(\w+\s+){0,3}(developer|admin|administrator|hacker|assistant|ai|"
    r"bot|model|expert|engineer|simulator|terminal|character|persona)\b",
    r"\b(system|initial|hidden|original)\s+(prompt|message|instructions?|configuration)\b",
    r"\byou\s+are\s+(now|no\s+longer)\b",
    r"\b(act|behave|roleplay|role-play)\s+as\b",
    r"\bpretend\s+(you|to\s+be)\b|\blet'?s\s+play\s+a\s+game\b",
    r"\b(developer|jailbreak|god|dan)\s+mode\b|\bjailbreak\b|\bDAN\b",
    r"\b(no|without)\s+(rules|restrictions|limits|filters)\b",
    # the assistant's own instructions, not "show me the instructions for the tool changer"
    r"\b(reveal|print|show|repeat|output|display)\b[^.?!\n]{0,30}\b((your|its|the\s+(system|initial|hidden|"
    r"original|above|previous|full|whole|complete))\s+(instructions?|prompts?|context|configuration|rules)|"
    r"prompts?|text\s+above|everything\s+(above|before|you))\b",
    r"\bfrom\s+now\s+on\b|\bnew\s+(rule|task|instructions?)\b",
    r"\b(simulate|become)\s+an?\s+\w*\s*(ai|assistant|chatbot)\b",
    r"\bsystem\s+override\b|\boverride\s*:",
    r"\b(disable|turn\s+off|switch\s+off|remove)\s+(the\s+|your\s+)?(topic\s+)?(filter|restrictions?|rules|guard|"
    r"safety|limits)\b",
    r"\byour\s+(new|real)\s+(task|job|purpose)\b",
    r"\bwrite\s+the\s+word\b[^.?!\n]{0,20}\band\s+nothing\s+else\b",
    r"\b(reply|respond|answer)\s+(only\s+)?with\s+(your|the)\s+(system|initial)\b",
]), re.IGNORECASE)


# Requests for the hidden instructions in words other than "system prompt": what came before, between tags, word
# for word, what the assistant was told or configured with.
EXTRACTION_MARKERS = re.compile("|".join([
    r"\b(word\s+for\s+word|verbatim)\b",
    r"\b(between|inside|within|in)\s+(the\s+)?<[^>\n]{1,30}>\s*tags?\b|\bbetween\s+the\s+(\w+\s+)?tags\b",
    r"\b(text|everything|words?|content)\s+(above|before|preceding)\s+(this|my|the|our)\b",
    r"\b(precedes?|preceding|came\s+before|before)\s+(my\s+first\s+message|the\s+conversation|this\s+(chat|"
    r"conversation))\b",
    r"\b(hidden|confidential|secret)\s+(text|instructions?|rules|directives?|prompt|setup|log|configuration|policy|"
    r"persona)\b",
    r"\b(internal|initial|original)\s+(instructions?|directives?|prompt|persona)\b",
    r"\byou\s+(were|have\s+been|are)\s+(told|given|configured|instructed|programmed|set\s+up)\b",
    r"\b(beginning|start)\s+of\s+(our|this|the)\s+(conversation|chat|session)\b",
    # "your" only: "show the instructions for the tool changer" is an operator's question
    r"\byour\s+(rules|instructions|directives|guidelines|configuration|persona|identity|initiali[sz]ation)\b"
    r"[^.?!\n]{0,40}\b(exact|exactly|wording|quote|list|summari[sz]e|show|print|output|display|repeat|dump|log)\b",
    r"\b(exact|exactly|wording|quote|list|summari[sz]e|show|print|output|display|repeat|dump|log)\b[^.?!\n]{0,40}"
    r"\byour\s+(rules|instructions|directives|guidelines|configuration|persona|identity|initiali[sz]ation)\b",
    r"\bsafety\s+polic(y|ies)\b|\bpolicy\s+string\b",
    # the assistant's own internals (not "your system" or "your database": operators ask the assistant to look
    # things up in them)
    r"\byour\s+(algorithm|source\s+code|code|memory|directories|login|server|host|internals?|weights|"
    r"training\s+data)\b",
    r"\b(files|directories|folders)\s+(you\s+have|on\s+your)\b|\bmemory\s+usage\s+details\b",
]), re.IGNORECASE)

# An off-topic request dressed as on topic, or a translation that is to be obeyed.
DRESSED_MARKERS = re.compile("|".join([
    r"\b(pretend|imagine|assume|treat|consider|regard)\b[^.?!\n]{0,30}\b(this|that|it|the\s+following)\b"
    r"[^.?!\n]{0,12}\b(is|as|was)\b[^.?!\n]{0,30}\b(question|request|topic|task)\b",
    r"\b(translate|decode|decipher|decrypt|convert|interpret)\b[^.?!\n]{0,60}\b(and|then)\s+(follow|obey|execute|do|"
    r"run|carry\s+out|act\s+on)\b",
    r"\b(decode|decipher|decrypt|convert)\b[^.?!\n]{0,40}\b(follow|obey|execute|do\s+what)\b",
    r"\b(follow|obey|execute)\b[^.?!\n]{0,20}\b(it|this|them)\b[^.?!\n]{0,30}\b(decod\w*|translat\w*|rot-?13|"
    r"base64|hex)\b",
    r"\bdo\s+what\s+it\s+says\b|\b(rot-?13|base-?64)\b[^.?!\n]{0,30}\b(decode|obey|follow|execute)\b",
    # the same in German, French, Spanish, Italian, Portuguese
    r"\b(übersetze|traduis|traduce|traduci|traduza)\b[^.?!\n]{0,40}\b(befolge|folge|exécute|suis|sigue|ejecuta|"
    r"segui|esegui|siga|execute)\b",
    r"\b(ignoriere|ignorier|vergiss|ignora|ignorez|oublie|olvida|dimentica|esqueça)\b[^.?!\n]{0,40}\b(regeln|"
    r"anweisungen|instructions|règles|instrucciones|reglas|istruzioni|regole|instruções|regras)\b",
]), re.IGNORECASE)

# Words that join a second task to the first: each part is judged on its own.
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
    """A rough guess: ``en``, one of ``OTHER_LANGUAGES``, ``other`` (another script) or ``""`` (cannot tell)."""
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


def encoded_payload(text: str) -> str:
    """What kind of encoded or disguised text ``text`` carries (``""`` for none): payloads a model may decode."""
    for m in re.finditer(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        token = m.group(0)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) >= 8 and sum(32 <= b < 127 for b in raw) >= 0.95 * len(raw) and re.search(rb"[A-Za-z]{2,} [A-Za-z]",
                                                                                              raw):
            return "base64"
    if len(re.findall(r"\\x[0-9a-fA-F]{2}", text)) >= 4:
        return "hex escapes"
    if len(re.findall(r"\\u\{?[0-9a-fA-F]{4}\}?", text)) >= 4:
        return "unicode escapes"
    if re.search(r"\+AD[A-Za-z0-9]{1,6}-", text):
        return "UTF-7"
    hexbytes = re.findall(r"(?:\b[0-9a-fA-F]{2}\b\s*){8,}", text)
    if any(re.search(r"[a-fA-F]", h) for h in hexbytes):
        return "hex bytes"
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
    """Words that mark a request as on topic (whole words, case-insensitive)."""
    blocked_subjects: tuple[str, ...] = ()
    """Regular expressions; a match in the request or the answer refuses."""
    on_topic: tuple[str, ...] = ()
    """Examples of requests to answer (the relevance layer's positives)."""
    off_topic: tuple[str, ...] = ()
    """Examples of requests to refuse (the relevance layer's negatives)."""
    refusal: str = "I can only help with questions about this line's machines, tools and safety."
    """The fixed refusal text: a refusal is as deterministic as an answer."""
    injection: Literal["refuse", "quote"] = "refuse"
    """``refuse`` requests that try to change the assistant's instructions; ``quote`` passes them on as data
    (the translator translates them)."""
    relevance: Literal["embedding", "yesno", "none"] = "embedding"
    """The relevance layer: nearest examples by llama.cpp embeddings, a yes/no question to the loaded model
    constrained by a grammar, or none (see the measured figures in the README)."""
    vocabulary: tuple[str, ...] = ()
    """Everyday words of the domain (``machine``, ``part``, ``shift``): not enough to put a request on topic, but
    enough for a task joined to an on-topic one (the embeddings of a small model are too weak to judge short parts
    alone)."""
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
    """Reason code: ``injection``, ``role_markers``, ``prompt_extraction``, ``encoded``, ``language``,
    ``blocked_subject``, ``off_topic``, ``compound``, ``off_topic_answer``, ``prompt_leak``."""
    detail: str = ""
    """What matched, for the log. An output check's detail quotes nothing of the answer: an answer may repeat the
    system prompt, and the log carries no text of it."""
    score: float | None = None
    """The relevance margin, where computed."""


ALLOW = Verdict(True)


def neutralize_markers(text: str) -> str:
    """User text with chat-template markers broken, so they tokenize as text, never as special tokens."""
    return ROLE_MARKERS.sub(lambda m: m.group(0).replace("<", "<\u200b").replace("[", "[\u200b")
                            .replace("#", "#\u200b").replace(":", "\u200b:"), text)


def check_input(text: str, cfg: GuardConfig) -> Verdict:
    """The cheap rules: role markers, injection phrases (when refused), blocked subjects."""
    if cfg.strictness == "off":
        return ALLOW
    if cfg.injection == "refuse":
        m = ROLE_MARKERS.search(text)
        if m:
            return Verdict(False, "input", "role_markers", f"chat-template marker {m.group(0).strip()!r}")
        m = INJECTION_MARKERS.search(text) or DRESSED_MARKERS.search(text)
        if m:
            return Verdict(False, "input", "injection", f"injection phrase {m.group(0)!r}")
        m = EXTRACTION_MARKERS.search(text)
        if m:
            return Verdict(False, "input", "prompt_extraction", f"asks for the instructions: {m.group(0)!r}")
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

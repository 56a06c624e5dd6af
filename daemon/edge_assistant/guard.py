"""The topic guard: input rules, a relevance check with a model on the device, and an output check.

Each layer returns a ``Verdict``; the first refusal wins and names its layer and a reason code. The rules are pure;
the relevance layer takes an ``Embedder`` (llama.cpp embeddings of the loaded model, see ``engine.Embedder``) and
compares the request with the persona's on-topic and off-topic examples, nearest neighbours first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Strictness = Literal["off", "low", "medium", "high"]

# Relevance margins (nearest on-topic minus nearest off-topic similarity) per strictness, chosen from the
# figures printed by scripts/eval_guard (see README, "Staying on topic").
THRESHOLDS: dict[str, float] = {"low": -0.01, "medium": 0.0, "high": 0.015}

# Chat-template and role markers: in user text they are an attempt to open a new turn.
ROLE_MARKERS = re.compile(
    r"<\|[a-z_]{2,20}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|^\s*#{2,}\s*(instruction|system|response)\b|"
    r"^\s*(system|assistant)\s*:", re.IGNORECASE | re.MULTILINE)

INJECTION_MARKERS = re.compile("|".join([
    r"\b(ignore|disregard|forget|override|bypass|skip)\b[^.?!\n]{0,40}\b(instructions?|rules?|directions?|"
    r"guidelines?|prompts?|polic(y|ies)|restrictions?|filters?|above|before|everything|previous|prior)\b",
    r"\b(system|initial|hidden|original)\s+(prompt|message|instructions?|configuration)\b",
    r"\byou\s+are\s+(now|no\s+longer)\b",
    r"\b(act|behave|roleplay|role-play)\s+as\b",
    r"\bpretend\s+(you|to\s+be)\b",
    r"\b(developer|jailbreak|god|dan)\s+mode\b|\bjailbreak\b|\bDAN\b",
    r"\b(no|without)\s+(rules|restrictions|limits|filters)\b",
    r"\b(reveal|print|show|repeat|output|display)\b[^.?!\n]{0,30}\b(instructions?|prompt|context|configuration|"
    r"text\s+above|everything)\b",
    r"\bfrom\s+now\s+on\b|\bnew\s+(rule|task|instructions?)\b",
    r"\b(simulate|become)\s+an?\s+\w*\s*(ai|assistant|chatbot)\b",
    r"\bsystem\s+override\b|\boverride\s*:",
    r"\b(disable|turn\s+off|switch\s+off|remove)\s+(the\s+|your\s+)?(topic\s+)?(filter|restrictions?|rules|guard|"
    r"safety|limits)\b",
    r"\byour\s+(new|real)\s+(task|job|purpose)\b",
    r"\bwrite\s+the\s+word\b[^.?!\n]{0,20}\band\s+nothing\s+else\b",
    r"\b(reply|respond|answer)\s+(only\s+)?with\s+(your|the)\s+(system|initial)\b",
]), re.IGNORECASE)


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
    """Reason code: ``injection``, ``role_markers``, ``blocked_subject``, ``off_topic``, ``prompt_leak``."""
    detail: str = ""
    """What matched, for the log."""
    score: float | None = None
    """The relevance margin, where computed."""


ALLOW = Verdict(True)


class Embedder(Protocol):
    """Unit-length embeddings of texts."""

    def embed(self, texts: Sequence[str], remember: bool = False) -> npt.NDArray[np.float32]: ...


@runtime_checkable
class Chooser(Protocol):
    """A model that picks one of several answers (``engine.Engine.choose``)."""

    def choose(self, messages: Sequence[dict[str, str]], options: Sequence[str], seed: int = 1) -> str: ...


def ask_yes_no(chooser: Chooser, domain: str, text: str) -> bool:
    """Ask the loaded model whether ``text`` belongs to ``domain`` (a GBNF grammar allows only yes or no)."""
    quoted = " ".join(text.split())[:500].replace("<", "(").replace(">", ")")
    messages = [{"role": "system", "content": "You decide whether a request belongs to a domain. Answer yes or no."},
                {"role": "user", "content": f"Domain: {domain}\nRequest: <<{quoted}>>\n"
                                            "Does the request belong to the domain?"}]
    return chooser.choose(messages, ["yes", "no"]) == "yes"


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
        m = INJECTION_MARKERS.search(text)
        if m:
            return Verdict(False, "input", "injection", f"injection phrase {m.group(0)!r}")
    for pattern in cfg.blocked_subjects:
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return Verdict(False, "input", "blocked_subject", f"blocked subject {pattern!r} matched {m.group(0)!r}")
    return ALLOW


def keyword_hit(text: str, cfg: GuardConfig) -> str:
    """The first allowed subject found in ``text`` as a whole word, or ``""``."""
    lowered = text.lower()
    for word in cfg.allowed_subjects:
        if re.search(rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])", lowered):
            return word
    return ""


@dataclass
class Relevance:
    """Nearest-example relevance for one persona, with the examples' embeddings computed once."""

    cfg: GuardConfig
    embedder: Embedder | None
    chooser: Chooser | None = None
    _on: npt.NDArray[np.float32] | None = field(default=None, init=False)
    _off: npt.NDArray[np.float32] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.embedder is not None and self.cfg.relevance == "embedding" and self.cfg.on_topic:
            t0 = time.monotonic()
            self._on = self.embedder.embed(self.cfg.on_topic, remember=True)
            self._off = self.embedder.embed(self.cfg.off_topic, remember=True)
            log.info("relevance examples embedded (%d on, %d off) in %.0f ms", len(self.cfg.on_topic),
                     len(self.cfg.off_topic), (time.monotonic() - t0) * 1000)

    @property
    def active(self) -> bool:
        """Whether this persona has a relevance layer."""
        if self.cfg.strictness == "off":
            return False
        if self.cfg.relevance == "yesno":
            return self.chooser is not None and bool(self.cfg.domain)
        return self._on is not None

    def margin(self, text: str, k: int = 3) -> float:
        """Mean of the ``k`` nearest on-topic similarities minus the same for off-topic examples."""
        assert self.embedder is not None and self._on is not None and self._off is not None
        v = self.embedder.embed([text])[0]
        on = np.sort(self._on @ v)[-k:].mean()
        off = np.sort(self._off @ v)[-k:].mean()
        return float(on - off)

    def check(self, text: str) -> Verdict:
        """Allow when an allowed subject is named or the margin clears the strictness threshold."""
        if self.cfg.strictness == "off":
            return ALLOW
        word = keyword_hit(text, self.cfg)
        if word:
            return Verdict(True, "relevance", "", f"allowed subject {word!r}")
        if not self.active:
            return ALLOW
        if self.cfg.relevance == "yesno":
            assert self.chooser is not None
            if ask_yes_no(self.chooser, self.cfg.domain, text):
                return Verdict(True, "relevance", "", "the model said yes")
            return Verdict(False, "relevance", "off_topic", "the model said the request is outside the domain")
        score = self.margin(text)
        threshold = THRESHOLDS[self.cfg.strictness]
        if score < threshold:
            return Verdict(False, "relevance", "off_topic", f"margin {score:.3f} below {threshold:.3f}", score)
        return Verdict(True, "relevance", "", f"margin {score:.3f}", score)


def check_output(answer: str, cfg: GuardConfig, system_prompt: str, window: int = 40) -> Verdict:
    """Before an answer leaves: no role markers, no blocked subject, no stretch of the system prompt."""
    if cfg.strictness == "off":
        return ALLOW
    m = ROLE_MARKERS.search(answer)
    if m:
        return Verdict(False, "output", "role_markers", f"answer contains {m.group(0).strip()!r}")
    for pattern in cfg.blocked_subjects:
        if re.search(pattern, answer, re.IGNORECASE):
            return Verdict(False, "output", "blocked_subject", f"answer matches {pattern!r}")
    norm_answer = " ".join(answer.lower().split())
    norm_prompt = " ".join(system_prompt.lower().split())
    size = window if cfg.strictness != "high" else window // 2
    for start in range(0, max(1, len(norm_prompt) - size + 1), max(1, size // 4)):
        piece = norm_prompt[start:start + size]
        if len(piece) >= size and piece in norm_answer:
            return Verdict(False, "output", "prompt_leak", f"answer repeats the system prompt: {piece!r}")
    return ALLOW

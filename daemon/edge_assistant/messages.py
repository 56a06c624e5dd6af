"""The values that travel between the layers: requests, replies, sampling settings, generations.

Pure data: the policy modules, the transports and the engine all import these, and nothing here imports an I/O
library, so a policy module never pulls in llama.cpp or paho.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Message = dict[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""

PRIORITY_ALARM = 0
"""Queue priority of PLC alarms: before everything else."""
PRIORITY_CHAT = 1
"""Queue priority of ordinary requests."""

FinishReason = Literal["stop", "length", "cancelled", "timeout"]
Status = Literal["ok", "error", "refused"]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings for one request (after the sampling policy)."""

    temperature: float
    """0 = greedy."""
    top_k: int
    """Top-k cut."""
    top_p: float
    """Nucleus cut."""
    min_p: float
    """Min-p cut."""
    repeat_penalty: float
    """1.0 = off."""
    max_tokens: int
    """Upper bound on generated tokens."""
    seed: int
    """Seed set before the request."""
    stop: tuple[str, ...] = ()
    """Generation ends before any of these strings (left out of the answer)."""
    grammar: str = ""
    """A GBNF grammar that constrains decoding (a JSON reply's schema); empty: free text."""
    adapter: str = ""
    """The LoRA adapter file applied to the model for this request; empty: the base model."""
    adapter_scale: float = 1.0
    """How strongly the adapter applies."""


@dataclass(frozen=True)
class Generation:
    """The result of one generation."""

    text: str
    """The answer."""
    prompt_tokens: int
    """Tokens in the rendered prompt."""
    completion_tokens: int
    """Tokens generated."""
    finish_reason: FinishReason
    """Why it stopped."""
    first_token_ms: float
    """From start to the first generated token (prompt processing included)."""
    total_ms: float
    """From start to the end."""
    prefix_cached: bool = False
    """Whether the persona's prefix was already in the KV cache."""

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token."""
        gen_ms = self.total_ms - self.first_token_ms
        return (self.completion_tokens - 1) / (gen_ms / 1000) if self.completion_tokens > 1 and gen_ms > 0 else 0.0


@dataclass(frozen=True)
class Request:
    """One question, from any transport."""

    text: str
    """The user's text."""
    persona: str = ""
    """Persona name; empty: the default persona."""
    id: str = ""
    """The client's request id, echoed in the reply."""
    max_tokens: int | None = None
    """Answer length bound (clamped to the ceiling)."""
    temperature: float | None = None
    """Requested temperature (clamped to the ceiling); None: the persona's."""
    stream: bool = False
    """Whether the client wants chunks while generating."""
    quoted: bool = False
    """The daemon assembled the text itself with every outside value quoted (PLC alarms): instructions inside it
    are data, and it is on topic by construction. The output check still applies."""
    lookup: tuple[str, ...] = ()
    """For a request the daemon assembled (``quoted``): the values to look up in the documents instead of its
    text (a PLC alarm's code, tag and alarm text)."""
    format: Literal["", "text", "json"] = ""
    """``json`` asks for a reply that follows the persona's schema; empty: the persona's own format."""
    conversation: str = ""
    """The client's name for the conversation this request continues (1 to 64 characters); empty: the request
    stands alone."""
    forget: bool = False
    """End the conversation before this request: its earlier turns are forgotten (with no text, that is all)."""


@dataclass(frozen=True)
class ErrorInfo:
    """A machine-readable error."""

    code: str
    """Stable code, e.g. ``busy``, ``bad_request``, ``context_overflow``, ``not_in_documents``."""
    message: str
    """A sentence for people."""


@dataclass(frozen=True)
class Usage:
    """What the request cost."""

    prompt_tokens: int
    """Tokens in the rendered prompt."""
    completion_tokens: int
    """Tokens generated."""
    finish_reason: str
    """``stop``, ``length``, ``cancelled`` or ``timeout``."""
    first_token_ms: float
    """From start to the first generated token."""
    total_ms: float
    """From start to the end."""
    tokens_per_s: float
    """Generation speed after the first token."""
    prefix_cached: bool = False
    """Whether the persona's prefix was already in the KV cache."""
    retrieval_ms: float | None = None
    """Time spent finding passages in the documents, when the persona answers from them."""


@dataclass(frozen=True)
class SourceRef:
    """A passage of the plant's documents that an answer was built from (chosen by code, not by the model)."""

    document: str
    """The document's path, relative to its configured knowledge path."""
    location: str
    """Where in it: ``page 3``, ``section Coolant > Concentration``, ``row 14 (code A412)``."""
    excerpt: str
    """The passage, cut to a few hundred characters."""


@dataclass(frozen=True)
class Passage:
    """A chunk retrieved for a question."""

    document: str
    """The document's name (relative to its knowledge path)."""
    location: str
    """Where in the document."""
    text: str
    """The chunk's text."""
    score: float
    """BM25 (lower is better, as FTS5 reports it); 0 for an identifier match."""
    coverage: float
    """Share of the question's words (weighted by rarity) the chunk contains; 1 for an identifier match."""
    matched: str = ""
    """``identifier`` (its row), ``identifier-text`` (mentioned in the text) or ``words``."""
    row_id: str = ""
    """A CSV row's identifier."""
    kind: str = ""
    """What the chunk is: ``section``, ``text``, ``page`` or ``row`` (as the reader made it)."""
    similarity: float = 0.0
    """Cosine similarity of the question to the chunk's closest unit (0 without sentence vectors)."""
    chunk: int = 0
    """The chunk's id in the index."""


@dataclass(frozen=True)
class Reply:
    """The answer to a request, in the shape every transport sends."""

    id: str
    """The request's id."""
    status: Status
    """``ok`` with text, ``error`` with an error, ``refused`` (off topic, or not in the documents) with the
    persona's fixed text."""
    text: str = ""
    """The answer."""
    persona: str = ""
    """The persona that answered."""
    error: ErrorInfo | None = None
    """Set when ``status`` is ``error`` or ``refused``."""
    usage: Usage | None = None
    """Token counts and timings."""
    sources: tuple[SourceRef, ...] = ()
    """The document passages the answer came from."""
    data: Any = None
    """In ``json`` format: the answer parsed, valid against the persona's schema (``text`` holds it as JSON)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model hash, quantization, seed, sampling, config hash, backend, index digest: what made this answer."""
    grounded: bool | None = None
    """For an answer (``ok``): true when it comes from the plant's documents (``sources`` name them), false when
    the model answered alone; None on errors and refusals."""
    conversation: str | None = None
    """The request's conversation, echoed; None (left out) for a request that stands alone."""
    turn: int | None = None
    """In a conversation: this request's number in it (1 for the first; 0 for a ``forget`` without text)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent to clients (empty optional fields left out; ``text`` always there)."""
        out = {k: v for k, v in asdict(self).items() if v not in (None, {}, [], ()) or k == "text"}
        if "usage" in out:
            out["usage"] = {k: v for k, v in out["usage"].items() if v is not None}
        return out


def error_reply(request_id: str, code: str, message: str, persona: str = "") -> Reply:
    """A reply carrying an error code and message."""
    return Reply(id=request_id, status="error", persona=persona, error=ErrorInfo(code, message))

"""One request to one reply: persona, input checks, sampling policy, engine.

Every transport (MQTT, voice, the CLI) builds a ``Request`` and gets a ``Reply``; the pipeline never raises for
a request's own faults, it answers them with an error reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

from .config import Config
from .engine import Embedder, Generation, Message, Sampling
from .errors import EdgeError, RequestError, UnknownPersonaError
from .guard import Chooser, GuardConfig, Relevance, Verdict, check_input, check_output
from .personas import build_messages
from .sampling import policy

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What the pipeline needs of an engine (``engine.Engine`` is one)."""

    sha256: str
    backend: str
    runtime: str

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> Generation: ...


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


@dataclass(frozen=True)
class ErrorInfo:
    """A machine-readable error."""

    code: str
    """Stable code, e.g. ``busy``, ``bad_request``, ``context_overflow``."""
    message: str
    """A sentence for people."""


@dataclass(frozen=True)
class Usage:
    """What the request cost."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    first_token_ms: float
    total_ms: float
    tokens_per_s: float
    prefix_cached: bool = False


@dataclass(frozen=True)
class Reply:
    """The answer to a request, in the shape every transport sends."""

    id: str
    """The request's id."""
    status: Literal["ok", "error", "refused"]
    """``ok`` with text, ``error`` with an error, ``refused`` (off topic) with the persona's refusal text."""
    text: str = ""
    """The answer."""
    persona: str = ""
    """The persona that answered."""
    error: ErrorInfo | None = None
    """Set when ``status`` is ``error`` or ``refused``."""
    usage: Usage | None = None
    """Token counts and timings."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model hash, quantization, seed, sampling, config hash, backend: what made this answer."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent to clients (``None`` fields left out)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, {}) or k in ("text",)}


def error_reply(request_id: str, exc: EdgeError, persona: str = "") -> Reply:
    """A reply carrying ``exc``'s code and message."""
    return Reply(id=request_id, status="error", persona=persona, error=ErrorInfo(exc.code, exc.message))


class Pipeline:
    """Turns requests into replies with one engine and one configuration."""

    def __init__(self, config: Config, engine: Generator, profile: str = "", quantization: str = "",
                 model_file: str = "", embedder: Embedder | None = None) -> None:
        self.engine = engine
        self.profile = profile
        self.quantization = quantization
        self.model_file = model_file
        self.embedder = embedder
        self.last_tokens_per_s = 0.0
        self.busy = False
        """Whether a generation is running (for health and the busy sensor)."""
        self.last_progress = time.monotonic()
        """When a generation last moved (start, or a new piece of text): the watchdog's measure of progress."""
        self.config = config
        self.relevance = self._relevance(config)

    def set_config(self, config: Config) -> None:
        """Use a new configuration (personas, guard examples, limits) from the next request on."""
        relevance = self._relevance(config)
        self.config, self.relevance = config, relevance

    def _relevance(self, config: Config) -> dict[str, Relevance]:
        chooser = self.engine if isinstance(self.engine, Chooser) else None
        return {name: Relevance(p.guard, self.embedder, chooser) for name, p in config.personas.items()}

    def handle(self, request: Request, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None, deadline: float | None = None) -> Reply:
        """Answer ``request``; errors of the request become error replies, nothing is raised for them."""
        config = self.config
        persona_name = request.persona or config.default_persona
        try:
            persona = config.personas.get(persona_name)
            if persona is None:
                raise UnknownPersonaError(
                    f"unknown persona {persona_name!r} (have: {', '.join(sorted(config.personas))})")
            if not request.text.strip():
                raise RequestError("the request has no text")
            if len(request.text) > persona.max_input_chars:
                raise RequestError(f"the text is {len(request.text)} characters; persona {persona_name!r} "
                                   f"takes at most {persona.max_input_chars}")
            guard = replace(persona.guard, injection="quote") if request.quoted else persona.guard
            verdict = check_input(request.text, guard)
            if verdict.allowed and not request.quoted:
                verdict = self.relevance[persona_name].check(request.text)
            if not verdict.allowed:
                return self._refuse(request, persona_name, persona.guard, verdict)
            sampling, notes = policy(persona, config.limits, request.temperature, request.max_tokens)
            for note in notes:
                log.info("request %s: %s", request.id or "-", note)
            if deadline is None:
                deadline = time.monotonic() + config.limits.request_timeout_s
            stop = threading.Event()
            seen: list[str] = []
            refused: list[Verdict] = []

            def watch(piece: str) -> None:
                # The output check runs on what has been generated so far, before a piece is passed on.
                self.last_progress = time.monotonic()
                seen.append(piece)
                out = check_output("".join(seen), persona.guard, persona.system_prompt)
                if not out.allowed:
                    refused.append(out)
                    stop.set()
                    return
                if on_text is not None:
                    on_text(piece)
                if cancel is not None and cancel.is_set():
                    stop.set()

            self.busy, self.last_progress = True, time.monotonic()
            try:
                gen = self.engine.generate(build_messages(persona, request.text), sampling, watch, stop, deadline)
            finally:
                self.busy, self.last_progress = False, time.monotonic()
        except RequestError as exc:
            log.info("request %s refused with %s: %s", request.id or "-", exc.code, exc.message,
                     extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "ERROR_CODE": exc.code})
            return error_reply(request.id, exc, persona_name)
        if refused:
            return self._refuse(request, persona_name, persona.guard, refused[0])
        self.last_tokens_per_s = gen.tokens_per_s or self.last_tokens_per_s
        log.info("request %s (%s): %d+%d tokens, %s, %.0f ms", request.id or "-", persona_name, gen.prompt_tokens,
                 gen.completion_tokens, gen.finish_reason, gen.total_ms,
                 extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "PROMPT_TOKENS": gen.prompt_tokens,
                        "COMPLETION_TOKENS": gen.completion_tokens, "DURATION_MS": round(gen.total_ms),
                        "FINISH_REASON": gen.finish_reason})
        usage = Usage(gen.prompt_tokens, gen.completion_tokens, gen.finish_reason, round(gen.first_token_ms, 1),
                      round(gen.total_ms, 1), round(gen.tokens_per_s, 2), gen.prefix_cached)
        finish = gen.finish_reason
        if finish in ("cancelled", "timeout"):
            message = ("the generation was cancelled" if finish == "cancelled" else
                       f"the generation ran past {config.limits.request_timeout_s:g} s and was stopped")
            return Reply(id=request.id, status="error", text=gen.text, persona=persona_name,
                         error=ErrorInfo(finish, message), usage=usage, provenance=self.provenance(sampling))
        return Reply(id=request.id, status="ok", text=gen.text.strip(), persona=persona_name, usage=usage,
                     provenance=self.provenance(sampling))

    def _refuse(self, request: Request, persona: str, guard: GuardConfig, verdict: Verdict) -> Reply:
        """The persona's fixed refusal, with the reason code; the details go to the log."""
        log.info("request %s refused by the %s check: %s (%s)", request.id or "-", verdict.layer, verdict.code,
                 verdict.detail, extra={"REQUEST_ID": request.id, "PERSONA": persona,
                                        "REFUSAL_REASON": verdict.code, "REFUSAL_LAYER": verdict.layer})
        return Reply(id=request.id, status="refused", text=guard.refusal, persona=persona,
                     error=ErrorInfo(verdict.code, f"refused by the {verdict.layer} check"))

    def provenance(self, sampling: Sampling) -> dict[str, Any]:
        """What made an answer: enough to reproduce it byte for byte."""
        return {
            "model_file": self.model_file,
            "model_sha256": self.engine.sha256,
            "quantization": self.quantization,
            "backend": self.engine.backend,
            "runtime": self.engine.runtime,
            "profile": self.profile,
            "device": self.config.device,
            "seed": sampling.seed,
            "sampling": asdict(sampling),
            "config_sha256": self.config.digest,
        }

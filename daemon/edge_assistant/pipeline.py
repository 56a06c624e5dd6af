"""One request to one reply: persona, input checks, documents, sampling policy, engine, output check.

``handle`` is called by the scheduler's inference thread only, with the ``Runtime`` of the moment. A request's own
faults (unknown persona, empty text, context overflow) come back as error replies; a refusal comes back as the
persona's fixed text. Anything else raised here is a bug, and the scheduler turns it into an ``internal`` reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from . import followup
from .config import Config, PersonaConfig
from .conversations import Context, Conversations, Turn
from .errors import RequestError, UnknownPersonaError
from .guard import AnswerGate, GuardConfig, Relevance, Verdict, check_input, check_output
from .knowledge import Choice, Found, Retriever, answer_from_row, choose, identifiers_in, sources_of
from .messages import ErrorInfo, Generation, Message, Passage, Reply, Request, Sampling, Usage, error_reply
from .personas import build_messages
from .sampling import policy
from .structured import validate

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What the pipeline needs of an engine (``engine.Engine`` is one; tests use a fake)."""

    sha256: str
    backend: str
    runtime: str

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> Generation: ...


class Closable(Protocol):
    """Something holding native memory (a model, an embedding context)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Runtime:
    """Everything a request is answered with, fixed for the runtime's life. A reload builds a new one and the
    scheduler swaps it in between two requests, so no request ever sees half of an old one and half of a new one."""

    config: Config
    """Personas, limits, guard settings."""
    engine: Generator
    """The loaded model."""
    relevance: Mapping[str, Relevance] = field(default_factory=dict)
    """Per persona: the guard's relevance layer, its examples embedded."""
    knowledge: Retriever | None = None
    """The plant's documents, when ``[knowledge] paths`` are configured."""
    embedder: Any = None
    """The embedding context behind ``relevance`` (kept so that a reload with the same model reuses it)."""
    model_file: str = ""
    """File name of the loaded model."""
    quantization: str = ""
    """Its quantization (``Q4_1``)."""
    profile: str = ""
    """The hardware profile it was loaded with."""
    resources: tuple[Closable, ...] = ()
    """What ``close`` releases: the engine, the embedder, the index connection."""
    adapters: Mapping[str, str] = field(default_factory=dict)
    """LoRA adapter file to its SHA-256, for every adapter the personas name (loaded beside the model)."""

    def close(self, keep: tuple[Closable, ...] = ()) -> None:
        """Release the model, the embedding context and the index (after the scheduler swapped this runtime
        out), except what ``keep`` names: the parts a new runtime took over."""
        for r in self.resources:
            if any(r is k for k in keep):
                continue
            try:
                r.close()
            except Exception:  # releasing must not stop a reload
                log.exception("error releasing %r", r)

    def provenance(self, sampling: Sampling) -> dict[str, Any]:
        """What made an answer: enough to reproduce it byte for byte."""
        out = {
            "model_file": self.model_file,
            "model_sha256": self.engine.sha256,
            "quantization": self.quantization,
            "backend": self.engine.backend,
            "runtime": self.engine.runtime,
            "profile": self.profile,
            "parallel": int(getattr(self.engine, "parallel", 1)),
            "determinism": "invariant" if getattr(self.engine, "invariant", True) else "per-request",
            "device": self.config.device,
            "seed": sampling.seed,
            "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(sampling).items()
                         if k != "grammar"},  # plain JSON types: a stored reply reads back equal
            "config_sha256": self.config.digest,
        }
        if sampling.grammar:
            out["grammar_sha256"] = hashlib.sha256(sampling.grammar.encode()).hexdigest()
        if sampling.adapter:
            out["adapter_sha256"] = self.adapters.get(sampling.adapter, "")
        if self.knowledge is not None:
            out["knowledge_sha256"] = self.knowledge.digest
        return out


@dataclass
class _Notes:
    """What a request in a conversation leaves for its turn to be remembered by (filled in by ``_answer``)."""

    plan: followup.Plan | None = None
    """How the documents were searched."""
    cited: list[Passage] = field(default_factory=list)
    """The passages the answer cites, the one it was taken from first."""
    history_turns: int | None = None
    """Earlier turns given to the model (after the context budget), where it generated."""
    leaned: bool = False
    """The topic check allowed it only with the question before it: it continues that subject."""


def handle(rt: Runtime, request: Request, on_text: Callable[[str], None] | None = None,
           cancel: threading.Event | None = None, deadline: float | None = None,
           progress: Callable[[], None] | None = None, conversations: Conversations | None = None) -> Reply:
    """Answer ``request`` with ``rt``; ``on_text`` gets each piece of the answer that passed the output check.

    ``progress`` is called whenever generation moves (the watchdog's measure of a live request). A request naming a
    ``conversation`` continues it in ``conversations`` (the scheduler's; a throwaway one when None); one without
    goes the same way it always did, and its reply has the same bytes.
    """
    if not request.conversation:
        return _answer(rt, request, on_text, cancel, deadline, progress)
    memory = conversations if conversations is not None else Conversations(rt.config.conversations)
    return _continue(rt, request, memory, on_text, cancel, deadline, progress)


def _continue(rt: Runtime, request: Request, memory: Conversations, on_text: Callable[[str], None] | None,
              cancel: threading.Event | None, deadline: float | None, progress: Callable[[], None] | None) -> Reply:
    """A request in a conversation: forget it first where asked, answer with its earlier turns, remember the turn.

    The turn is written down before the reply leaves, so a daemon killed after replying continues from it."""
    name = request.conversation
    persona_name = request.persona or rt.config.default_persona
    if request.forget:
        known = memory.forget(name)
        log.info("request %s: conversation forgotten%s", request.id or "-", "" if known else " (it was not kept)",
                 extra={"REQUEST_ID": request.id, "CONVERSATION": name})
        if not request.text.strip():
            return Reply(id=request.id, status="ok", text="", persona=persona_name, conversation=name, turn=0)
    ctx = memory.begin(name)
    notes = _Notes()
    reply = _answer(rt, request, on_text, cancel, deadline, progress, ctx, notes)
    memory.finish(name, _turn_of(request, reply, ctx, notes) if reply.status == "ok" else None)
    provenance = reply.provenance
    if provenance:
        provenance = {**provenance, "conversation_sha256": ctx.digest}
        if notes.plan is not None and notes.plan.carried:
            provenance["follow_up"] = {"carried": list(notes.plan.carried), "why": notes.plan.why}
        if notes.history_turns:
            provenance["history_turns"] = notes.history_turns
    return replace(reply, conversation=name, turn=ctx.turn, provenance=provenance)


def _turn_of(request: Request, reply: Reply, ctx: Context, notes: _Notes) -> Turn:
    """The answered turn as it is remembered: what it was about is the last turn's subject when it continued it
    (its subject was carried; without documents, it referred back and was judged with the question before it),
    else what its own question named (``followup.subject_of``)."""
    plan = notes.plan
    previous = ctx.previous
    sources = tuple((s.document, s.location) for s in reply.sources)
    continues = bool(plan.carried) if plan is not None else notes.leaned
    if previous is not None and continues:
        return Turn(request.text, reply.text, sources, previous.identifiers, previous.terms,
                    previous.subject_question)
    if plan is not None:
        idents, terms = followup.subject_of(plan.query, plan.found, notes.cited)
    else:  # no documents: only its identifiers say what it was about
        idents, terms = tuple(identifiers_in(request.text)), ()
    return Turn(request.text, reply.text, sources, idents, terms)


def _answer(rt: Runtime, request: Request, on_text: Callable[[str], None] | None = None,
            cancel: threading.Event | None = None, deadline: float | None = None,
            progress: Callable[[], None] | None = None, ctx: Context | None = None,
            notes: _Notes | None = None) -> Reply:
    """The request answered; with ``ctx``, as a turn of a conversation (``notes`` gets what its turn needs)."""
    config = rt.config
    persona_name = request.persona or config.default_persona
    persona = config.personas.get(persona_name)
    try:
        if persona is None:
            raise UnknownPersonaError(f"unknown persona {persona_name!r} (have: {', '.join(sorted(config.personas))})")
        if not request.text.strip():
            raise RequestError("the request has no text")
        if len(request.text) > persona.max_input_chars:
            raise RequestError(f"the text is {len(request.text)} characters; persona {persona_name!r} "
                               f"takes at most {persona.max_input_chars}")
        guard = replace(persona.guard, injection="quote") if request.quoted else persona.guard
        verdict = check_input(request.text, guard)
        if not verdict.allowed:
            return _refuse(request, persona_name, persona.guard, verdict)
        passages: list[Passage] = []
        choice: Choice | None = None
        retrieval_ms: float | None = None
        # A PLC alarm is looked up by its fields (code, tag, alarm text), not by the prompt built around them.
        query = " ".join(request.lookup) if request.quoted and request.lookup else request.text
        plan: followup.Plan | None = None
        if persona.knowledge.enabled and rt.knowledge is not None:
            t0 = time.monotonic()
            retriever = rt.knowledge
            if ctx is not None and not request.quoted:  # a follow-up may be retrieved with the last turn's subject

                def look(text: str) -> tuple[Found, Choice | None]:
                    f = retriever.find(text, limit=persona.knowledge.passages)
                    return f, choose(f, retriever.dense, retriever.min_coverage)

                plan = followup.plan(query, ctx.previous, look, retriever.dense, retriever.min_coverage)
                found, choice = plan.found, plan.choice
                log.info("request %s: %s", request.id or "-", plan.why, extra={"REQUEST_ID": request.id})
            else:
                found = retriever.find(query, limit=persona.knowledge.passages, strict_ids=not request.quoted)
                choice = choose(found, retriever.dense, retriever.min_coverage)
            if choice is not None and choice.supported:
                passages = list(found.passages)
            retrieval_ms = round((time.monotonic() - t0) * 1000, 2)
            # An identifier is an exact reference to the plant's data (an alarm code, a part number): one that no
            # document holds is answered by the documents' silence, before any judgement of the words around it.
            if found.unknown_identifier and not passages and persona.knowledge.fallback == "refuse":
                return _not_in_documents(request, persona_name, persona, retrieval_ms)
        if notes is not None:
            notes.plan = plan
        covered = bool(passages)  # the documents widen the domain: what they cover is on topic
        relevance = rt.relevance.get(persona_name) if not request.quoted else None
        if relevance is not None:  # a task joined to a covered one is still judged
            verdict, leaned = _relevant(relevance, request.text, covered, ctx, plan)
            if notes is not None:
                notes.leaned = leaned
            if not verdict.allowed:
                return _refuse(request, persona_name, persona.guard, verdict)
        if persona.knowledge.enabled and not covered and persona.knowledge.fallback == "refuse":
            if rt.knowledge is None:
                return _no_documents(request, persona_name, persona)
            return _not_in_documents(request, persona_name, persona, retrieval_ms)
        sampling, policy_notes = policy(persona, config.limits, request.temperature, request.max_tokens)
        for note in policy_notes:
            log.info("request %s: %s", request.id or "-", note)
        as_json = request.format == "json" or (not request.format and persona.format == "json")
        if as_json:
            if persona.grammar is None:
                raise RequestError(f"persona {persona_name!r} has no schema: it cannot answer in JSON")
            # The grammar ends the reply when the JSON is complete: room for its longest form is never wasted.
            room = min(max(sampling.max_tokens, persona.grammar.max_chars), config.limits.max_tokens_ceiling)
            sampling = replace(sampling, grammar=persona.grammar.gbnf, max_tokens=room)
            relevance = None  # the schema bounds the reply; its sentences are not prose to judge
        if persona.adapter:
            sampling = replace(sampling, adapter=persona.adapter_path(config.model.directory()),
                               adapter_scale=persona.adapter_scale)
        direct = None if as_json else _direct_answer(persona, passages, choice)
        if direct is not None:
            text, cited, how = direct
            # A quote is the documents' text, but it goes through the same output checks as generated text.
            out_verdict = check_output(text, guard, persona.system_prompt)
            if not out_verdict.allowed:
                return _refuse(request, persona_name, persona.guard, out_verdict)
            if on_text is not None:
                on_text(text)
            if notes is not None:
                notes.cited = cited
            usage = Usage(0, 0, "stop", 0.0, 0.0, 0.0, False, retrieval_ms)
            return Reply(id=request.id, status="ok", text=text, persona=persona_name, usage=usage,
                         sources=sources_of(cited, quoted=text),
                         provenance={**rt.provenance(sampling), "answer": how}, grounded=True)
        history = [(t.question, t.answer) for t in ctx.history] if ctx is not None else []
        gen, refused = _generate(rt, persona, request, passages, sampling, on_text, cancel, deadline, progress,
                                 relevance, history, notes)
        if notes is not None:
            notes.cited = passages
    except RequestError as exc:
        log.info("request %s refused with %s: %s", request.id or "-", exc.code, exc.message,
                 extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "ERROR_CODE": exc.code})
        return error_reply(request.id, exc.code, exc.message, persona_name)
    if refused is not None:
        return _refuse(request, persona_name, persona.guard, refused)
    log.info("request %s (%s): %d+%d tokens, %s, %.0f ms", request.id or "-", persona_name, gen.prompt_tokens,
             gen.completion_tokens, gen.finish_reason, gen.total_ms,
             extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "PROMPT_TOKENS": gen.prompt_tokens,
                    "COMPLETION_TOKENS": gen.completion_tokens, "DURATION_MS": round(gen.total_ms),
                    "FINISH_REASON": gen.finish_reason})
    usage = Usage(gen.prompt_tokens, gen.completion_tokens, gen.finish_reason, round(gen.first_token_ms, 1),
                  round(gen.total_ms, 1), round(gen.tokens_per_s, 2), gen.prefix_cached, retrieval_ms)
    sources = sources_of(passages)
    finish = gen.finish_reason
    data = None
    if as_json and finish not in ("cancelled", "timeout"):
        data, problems = _parse_json(gen.text, persona)
        if problems:
            log.warning("request %s: the JSON reply does not follow the schema: %s", request.id or "-",
                        "; ".join(problems))
            why = "the reply does not follow the schema: " + "; ".join(problems)
            if finish == "length":
                why += " (it ended at max_tokens: raise it)"
            return Reply(id=request.id, status="error", text=gen.text, persona=persona_name,
                         error=ErrorInfo("invalid_json", why), usage=usage, sources=sources,
                         provenance=rt.provenance(sampling))
    if finish in ("cancelled", "timeout"):
        message = ("the generation was cancelled" if finish == "cancelled" else
                   f"the generation ran past {config.limits.request_timeout_s:g} s and was stopped")
        return Reply(id=request.id, status="error", text=gen.text, persona=persona_name,
                     error=ErrorInfo(finish, message), usage=usage, sources=sources,
                     provenance=rt.provenance(sampling))
    return Reply(id=request.id, status="ok", text=gen.text.strip(), persona=persona_name, usage=usage,
                 sources=sources, data=data, provenance=rt.provenance(sampling), grounded=bool(sources))


def _parse_json(text: str, persona: PersonaConfig) -> tuple[Any, list[str]]:
    """The reply parsed, and what in it breaks the persona's schema (nothing when it follows it)."""
    assert persona.grammar is not None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, [f"not JSON ({exc.msg} at character {exc.pos})"]
    return data, validate(data, persona.grammar.schema)


def _direct_answer(persona: PersonaConfig, passages: list[Passage], choice: Choice | None,
                   ) -> tuple[str, list[Passage], str] | None:
    """An answer in the documents' own words, where the persona asks for one: the table row a question names by
    its identifier (``row``), or the unit of the documents that answers it (``quote``); with the passages to cite,
    the quoted one first."""
    if not passages or choice is None:
        return None
    if persona.knowledge.row_answers == "direct":
        row = answer_from_row(passages)
        if row is not None:
            return row, [passages[0]], "row"
    if persona.knowledge.prose_answers == "quote" and passages[0].matched != "identifier":
        passage = passages[choice.passage]
        return choice.text, [passage, *(p for p in passages if p is not passage)], "quote"
    return None


def _relevant(relevance: Relevance, text: str, covered: bool, ctx: Context | None,
              plan: followup.Plan | None) -> tuple[Verdict, bool]:
    """The relevance check of a request; in a conversation, with its context where the question leans on it. Also
    whether the verdict took the context (the question continues that subject).

    A follow-up that refers back (``followup.refers_back``: "Is it dangerous?", "And how often?") is judged
    together with the question that named the subject of the last answered turn ("What does alarm 2014 mean?", also
    after "How do I clear it?"), as a whole where its subject was carried (the documents covered the carried
    subject, not what this question asks: "Write me a poem about it" is still refused). Any other question names its
    own subject, and is judged alone, as a request outside a conversation is ("Who won the football last night?").
    A refused turn is never a context, so it leaves later turns as they were."""
    previous = ctx.previous if ctx is not None else None
    # Passages found with a carried subject cover that subject, not what this question asks.
    own = covered and not (plan is not None and bool(plan.carried))
    if previous is None or not followup.refers_back(text):
        return relevance.check(text, covered=own), False
    return relevance.check(f"{previous.subject_question} {text}", covered=own), True


def _fits(engine: Generator, messages: list[Message], max_tokens: int) -> bool:
    """Whether ``messages`` leave room for ``max_tokens`` in the engine's context (True where the engine cannot
    say: it still refuses a prompt that overflows)."""
    n_ctx = getattr(engine, "n_ctx", None)
    render = getattr(engine, "render", None)
    tokenize = getattr(engine, "tokenize", None)
    if not isinstance(n_ctx, int) or render is None or tokenize is None:
        return True
    return len(tokenize(render(messages))) + max_tokens <= n_ctx


def _generate(rt: Runtime, persona: PersonaConfig, request: Request, passages: list[Passage], sampling: Sampling,
              on_text: Callable[[str], None] | None, cancel: threading.Event | None, deadline: float | None,
              progress: Callable[[], None] | None, relevance: Relevance | None = None,
              history: list[tuple[str, str]] | None = None, notes: _Notes | None = None,
              ) -> tuple[Generation, Verdict | None]:
    """Run the engine; the output check (``AnswerGate``) sees the answer before any of it is passed on, and stops
    the generation when it refuses.

    A conversation's earlier turns (``history``, oldest first) go before the question as messages, as many as
    leave room for the answer in the context: the oldest are dropped first."""
    if deadline is None:
        deadline = time.monotonic() + rt.config.limits.request_timeout_s
    stop = threading.Event()
    gate = AnswerGate(persona.guard, persona.system_prompt, relevance, [p.text for p in passages])

    def watch(piece: str) -> None:
        if progress is not None:
            progress()
        released = gate.feed(piece)
        if gate.refused is not None:
            stop.set()
            return
        if released and on_text is not None:
            on_text(released)
        if cancel is not None and cancel.is_set():
            stop.set()

    turns = list(history or ())
    messages = build_messages(persona, request.text, passages, turns)
    while turns and not _fits(rt.engine, messages, sampling.max_tokens):
        turns.pop(0)
        messages = build_messages(persona, request.text, passages, turns)
    if notes is not None and history:
        notes.history_turns = len(turns)
        if len(turns) < len(history):
            log.info("request %s: %d earlier turn(s) of %d fit the context", request.id or "-", len(turns),
                     len(history))
    gen = rt.engine.generate(messages, sampling, watch, stop, deadline)
    rest = gate.finish(cut_short=gen.finish_reason == "length")
    if rest and on_text is not None:
        on_text(rest)
    return gen, gate.refused


def _refuse(request: Request, persona: str, guard: GuardConfig, verdict: Verdict) -> Reply:
    """The persona's fixed refusal, with the reason code; the details go to the log."""
    log.info("request %s refused by the %s check: %s (%s)", request.id or "-", verdict.layer, verdict.code,
             verdict.detail, extra={"REQUEST_ID": request.id, "PERSONA": persona,
                                    "REFUSAL_REASON": verdict.code, "REFUSAL_LAYER": verdict.layer})
    return Reply(id=request.id, status="refused", text=guard.refusal, persona=persona,
                 error=ErrorInfo(verdict.code, f"refused by the {verdict.layer} check"))


def _no_documents(request: Request, persona_name: str, persona: PersonaConfig) -> Reply:
    """The persona answers only from the plant's documents, and none are configured: the reply says where they
    are named, rather than letting a small model answer alone about a machine it knows nothing of."""
    why = (f"persona {persona_name!r} answers from the plant's documents and none are configured: name them in "
           f"[knowledge] paths, or set [personas.{persona_name}.knowledge] fallback = \"model\" to let the model "
           "answer alone")
    log.info("request %s: %s", request.id or "-", why,
             extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "REFUSAL_REASON": "no_documents"})
    return Reply(id=request.id, status="refused", text=persona.knowledge.not_found, persona=persona_name,
                 error=ErrorInfo("no_documents", why), usage=Usage(0, 0, "stop", 0.0, 0.0, 0.0, False, None))


def _not_in_documents(request: Request, persona_name: str, persona: PersonaConfig,
                      retrieval_ms: float | None) -> Reply:
    """The persona's fixed text for a question the documents do not cover."""
    log.info("request %s: nothing in the documents covers it", request.id or "-",
             extra={"REQUEST_ID": request.id, "PERSONA": persona_name, "REFUSAL_REASON": "not_in_documents"})
    usage = Usage(0, 0, "stop", 0.0, 0.0, 0.0, False, retrieval_ms)
    return Reply(id=request.id, status="refused", text=persona.knowledge.not_found, persona=persona_name,
                 error=ErrorInfo("not_in_documents", "the plant's documents do not cover this question"),
                 usage=usage)

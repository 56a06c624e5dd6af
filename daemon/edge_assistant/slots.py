"""Parallel slots: several requests decoded together, one batch per step, each in a KV cache of its own.

The engine hands a request here when its model was chosen with ``parallel`` above 1 (``models.slots``). One thread,
**decode**, owns the llama.cpp context, its KV cache (one stream per slot: ``kv_unified = false``) and every
sampler. Callers (the scheduler's request workers, through ``Engine.generate``) submit a sequence and read its
tokens from a queue; they never touch the context.

What makes an answer the same whether it is decoded alone or beside others:

- **A KV cache per slot.** Attention then reads only the sequence's own cells. (With one cache shared by all
  sequences, answers decoded together differed from answers decoded alone; ``scripts/bench``, section
  ``parallel``.)
- **Prompts are evaluated alone.** A new sequence's prompt goes through ``llama_decode`` in batches holding only its
  own tokens, the persona's prefix from position 0 first, then the user's turn: the same pieces as when served
  alone. Only the steps of generation (one token per active sequence) are batched together.
- **The prefix is shared by copying cells.** A slot that held the same prefix keeps those cells; otherwise the
  prefix is copied from another slot holding it (a whole-stream copy, then the cells after the prefix dropped), or
  evaluated. The cells hold the same numbers either way, at the same places.
- **A sampler chain per sequence**, seeded per request: the chain llama-cpp-python's ``generate`` builds.

A finished sequence's cells after the prefix are freed and its slot is free for the next request (continuous
batching). This holds for the quantizations in ``models.BATCH_INVARIANT`` on the CPU; elsewhere the model choice
keeps one slot unless ``determinism = "per-request"``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import EdgeError

log = logging.getLogger(__name__)

T = TypeVar("T")

READER_WAIT_S = 0.5
"""How long a step waits for a reader still handling the last token before it goes ahead anyway."""


class DecodeError(EdgeError):
    """llama.cpp could not decode a batch (the KV cache has no room, or the backend failed)."""

    code = "internal"


@dataclass(eq=False)
class Sequence:
    """One request in a slot: what to decode and where its tokens go."""

    prompt: list[int]
    """The whole prompt's tokens."""
    n_prefix: int
    """How many of them are the persona's prefix (shared between requests; 0: none)."""
    sampler: Mapping[str, Any]
    """Keyword arguments of the sampler chain (``top_k``, ``top_p``, ``min_p``, ``temp``, ``repeat_penalty``,
    ``grammar``)."""
    seed: int
    """The sampler's seed."""
    max_tokens: int
    """Stop after this many tokens."""
    out: queue.SimpleQueue[int | BaseException | None] = field(default_factory=queue.SimpleQueue)
    """Each sampled token; ``None`` at the end, or the error that ended it."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set by the reader when it wants no more tokens (cancelled, a stop string, a deadline)."""
    handled: int = 0
    """Tokens the reader has handled (it asked for the next one), counted under the decoder's lock."""
    prefix_cached: bool = False
    """Whether the prefix's cells were already there (kept in the slot, or copied from another)."""
    slot: int = -1
    pos: int = 0
    produced: int = 0
    last: int = 0
    chain: Any = None


@dataclass(eq=False)
class Call:
    """A computation run on another thread, its result or error handed back to the caller."""

    fn: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        """Run ``fn`` (on the thread that computes)."""
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 -- raised again in the caller's thread
            self.error = exc
        finally:
            self.done.set()

    def outcome(self) -> Any:
        """Wait for ``run``; what ``fn`` returned, or raise what it raised (in the caller's thread)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class SlotDecoder:
    """A llama.cpp context with ``n_slots`` KV caches of ``n_ctx`` tokens each, and the decode thread."""

    def __init__(self, llm: Any, n_slots: int, n_ctx: int, n_batch: int, n_ubatch: int,
                 is_eog: Callable[[int], bool], on_step: Callable[[Any], None] | None = None) -> None:
        """``llm`` is the ``llama_cpp.Llama`` holding the model (its own context is not used here); ``on_step``
        is called with the context before each decode (the engine sets thread counts there)."""
        import llama_cpp
        from llama_cpp import _internals

        self._lc = llama_cpp
        self._llm = llm
        self.n_slots = n_slots
        self.n_ctx = n_ctx
        self._n_batch = n_batch
        self._is_eog = is_eog
        self._on_step = on_step
        params = type(llm.context_params).from_buffer_copy(llm.context_params)  # the same settings, more room
        params.n_ctx = n_ctx * n_slots
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_slots
        params.kv_unified = False
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(max(n_batch, n_slots), 0, 1)
        self._held: list[list[int]] = [[] for _ in range(n_slots)]  # the prefix each slot's cells hold
        self._busy: list[Sequence | None] = [None] * n_slots
        self._waiting: list[Sequence] = []
        self._calls: list[Call] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self._thread.start()

    # -- callers -----------------------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> Generator[int, None, None]:
        """Queue ``seq`` and yield its tokens as they are sampled; closing the iterator frees its slot."""
        if len(seq.prompt) > self.n_ctx:
            raise ValueError(f"the prompt is {len(seq.prompt)} tokens and a slot holds {self.n_ctx}")
        with self._cond:
            if self._closed:
                raise DecodeError("the model is being released")
            self._waiting.append(seq)
            self._cond.notify_all()
        return self._read(seq)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the decode thread between two steps and return what it returns (or raise what it raised):
        other llama.cpp work of this process (the guard's embeddings) computes on this one thread."""
        if threading.current_thread() is self._thread:
            return fn()
        job = Call(fn)
        with self._cond:
            if self._closed:
                raise DecodeError("the model is being released")
            self._calls.append(job)
            self._cond.notify_all()
        return job.outcome()  # type: ignore[no-any-return]

    def _read(self, seq: Sequence) -> Generator[int, None, None]:
        try:
            while True:
                item = seq.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                with self._cond:
                    seq.handled += 1
                    self._cond.notify_all()
        finally:
            seq.done.set()
            with self._cond:
                self._cond.notify_all()

    def close(self) -> None:
        """End the decode thread (sequences still running end with an error) and free the context."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._lc.llama_batch_free(self._batch)
        self.ctx.close()  # type: ignore[no-untyped-call]

    # -- the decode thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._calls and not self._any_running():
                    self._cond.wait()
                if self._closed:
                    break
                new, self._waiting = self._waiting, []
                calls, self._calls = self._calls, []
            for job in calls:
                job.run()
            try:
                for seq in new:
                    self._start(seq)
                self._step()
            except Exception as exc:  # a bug here must not leave readers waiting forever
                log.exception("the decode loop failed; the requests it held end with an error")
                for seq in [s for s in self._busy if s is not None]:
                    seq.out.put(DecodeError(f"decoding failed: {exc}"))
                    self._drop(seq)
        for job in self._calls:
            job.error = DecodeError("the model was released")
            job.done.set()
        gone = DecodeError("the model was released while this request was decoding")
        for seq in [*self._waiting, *(s for s in self._busy if s is not None)]:
            seq.out.put(gone)
            self._drop(seq)

    def _any_running(self) -> bool:
        return any(s is not None and not s.done.is_set() for s in self._busy)

    def _start(self, seq: Sequence) -> None:
        """Put ``seq`` in a free slot, bring its prompt into the slot's cells, and sample its first token."""
        lc = self._lc
        self._reap()
        free = [k for k in range(self.n_slots) if self._busy[k] is None]
        if not free:  # more callers than slots: never so from the engine (workers == slots), kept safe anyway
            with self._cond:
                self._waiting.insert(0, seq)
            return
        prefix = seq.prompt[: seq.n_prefix]
        slot = next((k for k in free if prefix and self._held[k] == prefix), None)
        try:
            if slot is not None:
                seq.prefix_cached = True
            else:
                slot = next((k for k in free if not self._held[k]), free[0])
                lc.llama_memory_seq_rm(self._memory, slot, -1, -1)
                self._held[slot] = []
                source = next((k for k in range(self.n_slots) if k != slot and prefix and self._held[k] == prefix),
                              None)
                if source is not None:
                    # Across streams llama.cpp copies the whole stream (at the next decode); the cells after the
                    # prefix are dropped again here.
                    lc.llama_memory_seq_cp(self._memory, source, slot, -1, -1)
                    lc.llama_memory_seq_rm(self._memory, slot, len(prefix), -1)
                    seq.prefix_cached = True
                elif prefix:
                    self._evaluate(slot, prefix, 0)
                self._held[slot] = list(prefix)
            seq.slot = slot
            self._busy[slot] = seq
            self._llm.set_seed(seq.seed)
            seq.chain = self._llm._init_sampler(**seq.sampler)  # the chain llama-cpp-python's generate builds
            row = self._evaluate(slot, seq.prompt[len(prefix):], len(prefix))
            seq.pos = len(seq.prompt)
            self._sampled(seq, seq.chain.sample(self.ctx, row))
        except BaseException as exc:  # noqa: BLE001 -- the caller gets the error; the thread goes on
            seq.out.put(exc if isinstance(exc, Exception) else DecodeError(str(exc)))
            self._drop(seq)

    def _evaluate(self, slot: int, tokens: list[int], pos: int) -> int:
        """Decode ``tokens`` of one slot from ``pos`` in ``n_batch`` pieces, alone; the batch row of the last one."""
        b = self._batch
        for i in range(0, len(tokens), self._n_batch):
            piece = tokens[i: i + self._n_batch]
            b.n_tokens = 0
            for j, token in enumerate(piece):
                self._add(token, pos + i + j, slot, i + j == len(tokens) - 1)
            self._decode()
        return int(b.n_tokens) - 1

    def _step(self) -> None:
        """One token for every running sequence, decoded together."""
        self._reap()
        running = [s for s in self._busy if s is not None]
        if not running:
            return
        self._wait_for_readers(running)
        self._batch.n_tokens = 0
        for seq in running:
            self._add(seq.last, seq.pos, seq.slot, True)
        try:
            self._decode()
        except DecodeError as exc:
            for seq in running:
                seq.out.put(exc)
                self._drop(seq)
            return
        for row, seq in enumerate(running):
            seq.pos += 1
            self._sampled(seq, seq.chain.sample(self.ctx, row))

    def _reap(self) -> None:
        """Free the slots of sequences whose readers stopped reading (cancelled, a stop string, a deadline)."""
        for seq in list(self._busy):
            if seq is not None and seq.done.is_set():
                self._finish(seq)

    def _wait_for_readers(self, running: list[Sequence]) -> None:
        """Wait until every reader has handled its last token, running the calls they make meanwhile (a sentence's
        embedding): on a small machine the readers' work (text, output checks, streaming) would otherwise run beside
        llama.cpp's threads and slow every step. A reader slower than ``READER_WAIT_S`` is not waited for."""
        end = time.monotonic() + READER_WAIT_S

        def ready() -> bool:
            return bool(self._calls) or all(s.done.is_set() or s.handled >= s.produced for s in running)

        while True:
            with self._cond:
                self._cond.wait_for(ready, max(0.0, end - time.monotonic()))
                calls, self._calls = self._calls, []
            if not calls:
                return
            for job in calls:
                job.run()

    def _sampled(self, seq: Sequence, token: int) -> None:
        seq.out.put(token)
        seq.produced += 1
        seq.last = token
        if self._is_eog(token) or seq.produced >= seq.max_tokens or seq.pos >= self.n_ctx:
            self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """End ``seq``: its reader gets the end, its slot keeps only the prefix's cells."""
        seq.out.put(None)
        self._drop(seq)

    def _drop(self, seq: Sequence) -> None:
        if seq.slot >= 0 and self._busy[seq.slot] is seq:
            n = len(self._held[seq.slot])
            self._lc.llama_memory_seq_rm(self._memory, seq.slot, n if n else -1, -1)
            self._busy[seq.slot] = None
        if seq.chain is not None:
            seq.chain.close()
            seq.chain = None

    def _add(self, token: int, pos: int, slot: int, logits: bool) -> None:
        b, i = self._batch, self._batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = slot
        b.n_tokens += 1

    def _decode(self) -> None:
        if self._on_step is not None:
            self._on_step(self.ctx.ctx)
        rc = self._lc.llama_decode(self.ctx.ctx, self._batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc} for a batch of {self._batch.n_tokens} tokens")


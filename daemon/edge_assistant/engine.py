"""The engine: owns the ``llama_cpp.Llama`` instance, keeps it loaded, runs one generation at a time.

Determinism: before every request the seed is set, and the prompt is always evaluated in the same two pieces: the
persona's prefix (system prompt and examples) from position 0, then the user's turn from the end of the prefix,
each in ``n_batch`` chunks. When the previous request left the same prefix in the KV cache, its cells are kept and
only the user's turn is evaluated (the persona's prefix cache); otherwise the cache is reset and the prefix
evaluated first. Either way the same arithmetic runs, so an answer never depends on what was asked before.
(llama-cpp-python's own prefix reuse splits prompts wherever the previous one ended; on CUDA that was seen to
change answers, and evaluating the last token alone shifts logits.)

With ``parallel`` slots (``ModelChoice.parallel`` above 1) generation goes to ``slots.SlotDecoder`` instead: its
decode thread steps every running request together, each in a KV cache of its own, under the same rule (prefix from
position 0, then the user's turn); callers on several threads wait only for their own tokens.

Per request the engine also applies what the sampling names: a persona's LoRA adapter (loaded once beside the
mapped model, switched on the context; the prefix cache is only reused under the adapter it was computed with), a
GBNF grammar (a JSON reply's schema), and stop strings. Its thread counts follow the machine's load (``cpuload``).

The engine is synchronous. With one slot the scheduler's one request worker generates, holding the engine's lock
for the whole generation; every other llama.cpp computation on the model (the guard's embeddings, also those a
reload computes on its own thread) goes through ``Engine.run``, which takes the same lock, so none overlaps a
generation. With several slots each of the scheduler's request workers calls ``generate``, and only the slots'
decode thread computes: generations, and the embeddings ``Engine.run`` hands it.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .cpuload import ContextThreads, ThreadGovernor, psutil_sampler
from .errors import ConfigError, ContextOverflowError, ModelCorruptError, ModelTooLargeError
from .messages import FinishReason, Generation, Message, Sampling
from .models import ModelChoice, sha256_file
from .profiles import Settings
from .slots import Call, SlotDecoder
from .slots import Sequence as SlotSequence

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[[Callable[[], Any]], Any]
"""Runs a computation on the thread that computes with the model (``Engine.run``)."""

MAX_EMBED_TOKENS = 128
"""The guard's relevance check embeds at most this many tokens of a request."""

class Engine:
    """A loaded model. Create with ``Engine.load``."""

    def __init__(self, llm: Any, choice: ModelChoice, settings: Settings, sha256: str,
                 governor: ThreadGovernor | None = None) -> None:
        self._llm = llm
        self.governor = governor
        """Lowers the thread counts while other processes keep the CPUs busy (None: the planned counts)."""
        self._threads = ContextThreads(governor, _thread_setter(llm))
        self._lock = threading.RLock()
        """Held for every computation on the model with one slot: a generation (whose answer check embeds, so the
        generating thread takes it again), ``run``'s computations, adapters, ``close``."""
        self.choice = choice
        self.settings = settings
        self.sha256 = sha256
        self.parallel = choice.parallel
        """Requests decoded together (slots); 1: one at a time on ``llm``'s own context."""
        self.invariant = choice.invariant
        """Whether an answer decoded beside others equals the same answer decoded alone."""
        self._slots: SlotDecoder | None = None
        if choice.parallel > 1:
            import llama_cpp

            threads = ContextThreads(governor, lambda n, nb: llama_cpp.llama_set_n_threads(self._slot_ctx, n, nb))
            try:
                self._slots = SlotDecoder(llm, choice.parallel, choice.n_ctx, settings.n_batch, settings.n_ubatch,
                                          _eog_check(llm), on_step=lambda ctx: threads.update())
            except ValueError as exc:  # llama.cpp could not allocate the context (its KV caches, its buffers)
                llm.close()
                raise ModelTooLargeError(f"{choice.info.path.name}: llama.cpp could not make a context of "
                                         f"{choice.parallel} slots of {choice.n_ctx} tokens ({exc}); lower "
                                         "profile.parallel or profile.n_ctx") from exc
            self._slot_ctx = self._slots.ctx.ctx
            log.info("%d slots of %d tokens each, decoded together", choice.parallel, choice.n_ctx)
        self.n_ctx: int = choice.n_ctx if self._slots is not None else int(llm.n_ctx())
        self._formatter = _formatter(llm)
        self._prefix_formatter = _formatter(llm, add_generation_prompt=False)
        self._prefix_tokens: dict[tuple[tuple[str, str], ...], list[int]] = {}
        self._eog = _eog_check(llm)
        self._grammars: dict[str, Any] = {}
        self._adapters: dict[str, tuple[Any, str]] = {}  # file -> (llama_adapter_lora pointer, SHA-256)
        self._active: tuple[str, float] = ("", 1.0)  # the adapter (and scale) on the context now
        self._kv_adapter: tuple[str, float] = ("", 1.0)  # the adapter the KV cache was computed with
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload()) and settings.n_gpu_layers != 0
        self.backend = f"gpu({settings.n_gpu_layers} layers)" if offload else "cpu"
        self.runtime = f"llama-cpp-python {llama_cpp.__version__}"

    @classmethod
    def load(cls, choice: ModelChoice, settings: Settings, sha256: str) -> Engine:
        """Memory-map the chosen model with the profile's settings."""
        import llama_cpp  # imported here: the pure policy modules and the CLI's detect need no llama.cpp

        path = choice.info.path
        t0 = time.monotonic()
        # With slots the Llama object holds the model, its tokenizer and template; the slots get a context of their
        # own, so this one is kept small.
        small = choice.parallel > 1
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=256 if small else choice.n_ctx,
                n_batch=min(settings.n_batch, 256) if small else settings.n_batch,
                n_ubatch=min(settings.n_ubatch, 256) if small else settings.n_ubatch,
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads_batch,
                n_gpu_layers=settings.n_gpu_layers,
                use_mmap=settings.use_mmap,
                use_mlock=settings.use_mlock,
                seed=1,
                verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError when llama.cpp cannot load the file
            raise ModelCorruptError(f"{path}: llama.cpp could not load it: {exc}") from exc
        log.info("loaded %s (%s, n_ctx %d, %d/%d threads) in %.2f s", path.name, choice.info.quantization,
                 choice.n_ctx, settings.n_threads, settings.n_threads_batch, time.monotonic() - t0)
        governor = ThreadGovernor(settings.n_threads, settings.n_threads_batch, settings.usable_cpus,
                                  psutil_sampler(settings.cpus) if settings.usable_cpus else None)
        return cls(llm, choice, settings, sha256, governor)

    def close(self) -> None:
        """Unmap the model and free its context (the engine is unusable afterwards)."""
        import llama_cpp

        if self._slots is not None:
            self._slots.close()
        with self._lock:
            if self._adapters:
                llama_cpp.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
                for pointer, _ in self._adapters.values():
                    llama_cpp.llama_adapter_lora_free(pointer)
                self._adapters.clear()
            self._llm.close()

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` (an embedding) where it neither overlaps a generation nor slows later ones down.

        With slots ``fn`` runs on the decode thread between two steps. With one slot it runs under the generation
        lock: a reload embedding the guard's new examples on the reload thread waits for the running generation
        to end (they share the CPUs and the thread governor), and the generating thread itself (its answer check)
        runs it at once.

        llama.cpp's OpenMP threads form a team per calling thread, and a computation on a second thread that lives
        on slowed every later step of the generating thread (133 to 90 tokens/s with slots; 115 to 55 with one
        slot, after the main thread had embedded the guard's examples at start). So a call from the main thread
        runs on a thread that ends with it; other callers (the request worker, a start-up or reload thread, which
        end) run it themselves.
        """
        if self._slots is not None:
            return self._slots.call(fn)
        with self._lock:
            if threading.current_thread() is threading.main_thread():
                return _on_short_thread(fn)
            return fn()

    def load_adapters(self, files: Mapping[str, str]) -> dict[str, str]:
        """Load the LoRA adapters ``files`` names (where they are configured -> file) beside the model, once each;
        the file -> SHA-256 of every one. ``ConfigError`` names the place and the file of one that does not fit."""
        import llama_cpp

        out: dict[str, str] = {}
        if files and self._slots is not None:
            where = next(iter(files))
            raise ConfigError(f"{where}: a LoRA adapter applies to every request decoded together; it needs "
                              f"parallel = 1 (the model runs {self.parallel} slots)")
        with self._lock:
            for where, path in files.items():
                if path not in self._adapters:
                    try:
                        sha = sha256_file(Path(path))
                    except OSError as exc:
                        raise ConfigError(f"{where}: {path}: {exc.strerror or exc}") from exc
                    pointer = llama_cpp.llama_adapter_lora_init(self._llm.model, path.encode())
                    if not pointer:
                        raise ConfigError(f"{where}: {path} is not a LoRA adapter for {self.choice.info.path.name} "
                                          "(another architecture, other tensor shapes, or a damaged file)")
                    self._adapters[path] = (pointer, sha)
                    log.info("loaded the LoRA adapter %s (sha256 %s)", path, sha[:16])
                out[path] = self._adapters[path][1]
        return out

    def _use_adapter(self, path: str, scale: float) -> None:
        """Put adapter ``path`` (``""``: none) on the context; called with the lock held, before a generation."""
        import llama_cpp

        if (path, scale) == self._active:
            return
        if path:
            if path not in self._adapters:
                raise ConfigError(f"the LoRA adapter {path} was not loaded")
            pointers = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[path][0])
            scales = (ctypes.c_float * 1)(scale)
            llama_cpp.llama_set_adapters_lora(self._llm.ctx, pointers, 1, scales)
        else:
            llama_cpp.llama_set_adapters_lora(self._llm.ctx, None, 0, None)
        self._active = (path, scale)

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages`` in the model's own chat template."""
        return str(self._formatter(messages=list(messages)).prompt)

    def tokenize(self, prompt: str) -> list[int]:
        """Tokens of a rendered prompt (special tokens parsed, no extra BOS: the template has it)."""
        return list(self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def generate(self, messages: Sequence[Message], sampling: Sampling,
                 on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None,
                 deadline: float | None = None) -> Generation:
        """Generate an answer to ``messages``; ``on_text`` gets each new piece of text as it is decoded.

        ``cancel`` is checked between tokens; ``deadline`` (``time.monotonic()``) bounds the whole generation.
        Raises ``ContextOverflowError`` before generating if the prompt does not fit the context.
        """
        prompt = self.tokenize(self.render(messages))
        room = self.n_ctx - len(prompt)
        if room < 1:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens and the context holds {self.n_ctx}: shorten the input")
        max_tokens = min(sampling.max_tokens, room)
        with self._lock:
            prefix = self._prefix(messages, prompt)
            if self._slots is None:
                return self._run(prompt, prefix, sampling, max_tokens, on_text, cancel, deadline)
            grammar = self._grammar(sampling.grammar)
        return self._run_in_slot(prompt, prefix, sampling, grammar, max_tokens, on_text, cancel, deadline)

    def _prefix(self, messages: Sequence[Message], prompt: list[int]) -> list[int]:
        """Tokens of everything before the last message, if they are exactly the start of ``prompt``."""
        if len(messages) < 2:
            return []
        key = tuple((m["role"], m["content"]) for m in messages[:-1])
        head = self._prefix_tokens.get(key)
        if head is None:
            head = self.tokenize(str(self._prefix_formatter(messages=list(messages[:-1])).prompt))
            if len(self._prefix_tokens) >= 16:
                self._prefix_tokens.pop(next(iter(self._prefix_tokens)))
            self._prefix_tokens[key] = head
        return head if 0 < len(head) < len(prompt) and prompt[: len(head)] == head else []

    def _grammar(self, gbnf: str) -> Any:
        """A ``LlamaGrammar`` for ``gbnf`` (parsed once per grammar text), or None for free text."""
        if not gbnf:
            return None
        grammar = self._grammars.get(gbnf)
        if grammar is None:
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = self._grammars[gbnf] = LlamaGrammar.from_string(gbnf, verbose=False)
        return grammar

    def choose(self, messages: Sequence[Message], options: Sequence[str], seed: int = 1) -> str:
        """The option the model picks after ``messages``, decoding greedily under a GBNF grammar of the options."""
        from llama_cpp.llama_grammar import LlamaGrammar

        alternatives = " | ".join('"' + o.replace("\\", "\\\\").replace('"', '\\"') + '"' for o in options)
        grammar = LlamaGrammar.from_string(f"root ::= {alternatives}", verbose=False)
        prompt = self.tokenize(self.render(messages))
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt is {len(prompt)} tokens and the context holds {self.n_ctx}")
        longest = max(len(o) for o in options)
        if self._slots is not None:
            seq = SlotSequence(prompt, 0, {"temp": 0.0, "grammar": grammar}, seed, longest)
            out = Collector(self._llm, StopText(()))
            out.feed(self._slots.submit(seq), longest, None, None, None, self._eog)
            return out.text().strip()
        with self._lock:
            self._threads.update(starting=True)
            self._use_adapter("", 1.0)  # the guard's question goes to the base model
            self._kv_adapter = self._active
            self._llm.set_seed(seed)
            self._llm.reset()
            out = self._llm.create_completion(prompt, max_tokens=longest, temperature=0.0, grammar=grammar)
        return str(out["choices"][0]["text"]).strip()

    def _run(self, prompt: list[int], prefix: list[int], sampling: Sampling, max_tokens: int,
             on_text: Callable[[str], None] | None, cancel: threading.Event | None,
             deadline: float | None) -> Generation:
        llm = self._llm
        llm.set_seed(sampling.seed)
        t0 = time.monotonic()
        self._threads.update(starting=True)
        self._use_adapter(sampling.adapter, sampling.adapter_scale)
        n = len(prefix)
        # The KV cache of a prefix is only reused under the adapter it was computed with.
        same_adapter = self._kv_adapter == self._active
        cached = bool(n and same_adapter and llm.n_tokens >= n and list(llm.input_ids[:n]) == prefix)
        self._kv_adapter = self._active
        if cached:
            llm.n_tokens = n  # keep the prefix's KV cells; generate() drops the rest and evaluates the user's turn
        else:
            llm.reset()
            if n:
                llm.eval(prefix)
        gen = llm.generate(prompt, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                           temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty, reset=True,
                           grammar=self._grammar(sampling.grammar))
        out = Collector(llm, StopText(sampling.stop), on_text)
        try:
            out.feed(gen, max_tokens, cancel, deadline, self._threads.update, self._eog)
        finally:
            gen.close()
        return out.generation(len(prompt), t0, cached)

    def _run_in_slot(self, prompt: list[int], prefix: list[int], sampling: Sampling, grammar: Any, max_tokens: int,
                     on_text: Callable[[str], None] | None, cancel: threading.Event | None,
                     deadline: float | None) -> Generation:
        assert self._slots is not None
        if sampling.adapter:
            raise ConfigError(f"the LoRA adapter {sampling.adapter} needs parallel = 1")
        t0 = time.monotonic()
        seq = SlotSequence(prompt, len(prefix), {
            "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p, "temp": sampling.temperature,
            "repeat_penalty": sampling.repeat_penalty, "grammar": grammar},
            sampling.seed, max_tokens)
        tokens = self._slots.submit(seq)
        out = Collector(self._llm, StopText(sampling.stop), on_text)
        try:
            out.feed(tokens, max_tokens, cancel, deadline, None, self._eog)
        finally:
            tokens.close()
        return out.generation(len(prompt), t0, seq.prefix_cached)


class Collector:
    """Turns tokens into text as they come: UTF-8 pieces, stop strings, the finish reason, the first token's time."""

    def __init__(self, llm: Any, stops: StopText, on_text: Callable[[str], None] | None = None) -> None:
        self._llm = llm
        self._stops = stops
        self._on_text = on_text
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pieces: list[str] = []
        self.count = 0
        self.finish: FinishReason = "length"
        self.first = 0.0

    def feed(self, tokens: Iterator[int], max_tokens: int, cancel: threading.Event | None, deadline: float | None,
             between: Callable[[], None] | None, is_eog: Callable[[int], bool]) -> None:
        """Read ``tokens`` until the end of generation, a stop string, ``max_tokens``, ``cancel`` or ``deadline``;
        ``between`` runs after each token."""
        for token in tokens:
            if not self._take(token, max_tokens, cancel, deadline, is_eog):
                break
            if between is not None:
                between()
        stopped_here = self.finish == "stop" and self._stops.stopped
        self._emit("" if stopped_here else self._stops.flush(self._decoder.decode(b"", final=True)))

    def _take(self, token: int, max_tokens: int, cancel: threading.Event | None, deadline: float | None,
              is_eog: Callable[[int], bool]) -> bool:
        """Handle one token; False when generation ends here."""
        if not self.first:
            self.first = time.monotonic()
        if is_eog(token):
            self.finish = "stop"
            return False
        self.count += 1
        piece, stopped = self._stops.feed(self._decoder.decode(self._llm.detokenize([token], special=False)))
        self._emit(piece)
        if stopped:
            self.finish = "stop"
            return False
        if self.count >= max_tokens:
            return False
        if cancel is not None and cancel.is_set():
            self.finish = "cancelled"
            return False
        if deadline is not None and time.monotonic() > deadline:
            self.finish = "timeout"
            return False
        return True

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            if self._on_text is not None:
                self._on_text(piece)

    def text(self) -> str:
        """Everything decoded so far."""
        return "".join(self.pieces)

    def generation(self, prompt_tokens: int, t0: float, prefix_cached: bool) -> Generation:
        """The result, timed from ``t0``."""
        end = time.monotonic()
        return Generation(text=self.text(), prompt_tokens=prompt_tokens, completion_tokens=self.count,
                          finish_reason=self.finish, first_token_ms=((self.first or end) - t0) * 1000,
                          total_ms=(end - t0) * 1000, prefix_cached=prefix_cached)


class StopText:
    """Cuts generated text before the first stop string, holding back a tail that may be one's beginning."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that may leave now, and whether a stop string was reached."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[: min(hits)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self, tail: str) -> str:
        """What is left at the end of generation."""
        out, _ = self.feed(tail) if tail else ("", False)
        out, self.held = out + self.held, ""
        return out


RECENT_EMBEDDINGS = 64
"""Embeddings of texts not remembered that an embedder keeps in memory, the last ones used."""


class LlamaEmbedder:
    """Unit-length sentence embeddings through llama.cpp: from a sentence-embedding model (a BERT GGUF that pools
    its tokens itself; ``kind`` ``sentence``), or from the chat model's GGUF file (a second, small context, the
    mean of the tokens' hidden states; ``kind`` ``llm``, the weights memory-mapped once by the kernel for both).
    """

    def __init__(self, llm: Any, cache: Path | None = None, governor: ThreadGovernor | None = None,
                 runner: Runner | None = None) -> None:
        self._llm = llm
        arch = str(llm.metadata.get("general.architecture", ""))
        pooled = int(llm.metadata.get(f"{arch}.pooling_type", "0") or 0) > 0
        # "sentence" when the model pools its own tokens into one vector (trained for that), else "llm".
        self.kind = "sentence" if pooled else "llm"
        self._runner: Runner = runner or _call
        self._threads = ContextThreads(governor, _thread_setter(llm))
        self._lock = threading.Lock()
        """Guards the remembered and recent embeddings; never held while computing (the runner may wait for a
        generation whose answer check embeds too)."""
        self._context = threading.Lock()
        """Held while the context computes (inside the runner), and by ``close``."""
        self.cache_path = cache
        """Where remembered embeddings are kept across restarts (None: in memory only)."""
        self._cache: dict[str, Any] = {}
        # The last texts embedded and not remembered: the answer check judges a sentence alone and with its
        # neighbours, and judges again a sentence that waited for the next one.
        self._recent: OrderedDict[str, Any] = OrderedDict()
        if cache is not None and cache.is_file():
            import numpy as np

            try:
                with np.load(cache) as data:
                    self._cache = {str(k): v for k, v in zip(data["texts"], data["vectors"], strict=True)}
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring the embedding cache %s: %s", cache, exc)

    @classmethod
    def load(cls, path: str, n_threads: int, cache: Path | None = None,
             governor: ThreadGovernor | None = None, runner: Runner | None = None) -> LlamaEmbedder:
        """Open ``path`` for embeddings; ``cache`` keeps remembered embeddings across restarts.

        ``governor`` (the engine's, planned with ``n_threads`` for both counts) lowers the threads under load;
        ``runner`` (the engine's ``run``) runs each computation on the thread that computes with the model.
        """
        import llama_cpp

        # Pooling is left to the model's default (none for chat models: one vector per token) and done here:
        # asking llama.cpp for mean pooling on such a model makes it print a warning on every load.
        llm = llama_cpp.Llama(model_path=path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                              n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
        return cls(llm, cache, governor, runner)

    def close(self) -> None:
        """Free the embedding context."""
        with self._context:
            self._llm.close()

    def embed(self, texts: Sequence[str], remember: bool = False) -> Any:
        """One row per text, each of unit length (all zeros for a text llama.cpp could not embed); ``remember`` keeps
        them in the cache file (guard examples).

        Texts are embedded one at a time: llama-cpp-python's batched ``embed`` of several texts gave vectors
        far from the one-at-a-time ones with this model. Only the first ``MAX_EMBED_TOKENS`` tokens are embedded:
        llama.cpp keeps the buffers of the largest input it was given, about 0.3 MB per token with this model
        (a 512-token input raised the resident memory by 156 MB for good), and a topic shows in the first ones.
        """
        import numpy as np

        rows = []
        new = 0
        for text in texts:
            with self._lock:
                vec = self._cache.get(text)
                if vec is None and text in self._recent:
                    self._recent.move_to_end(text)
                    vec = self._recent[text]
            if vec is None:
                computed = True
                try:
                    out = np.asarray(self._runner(functools.partial(self._compute, text)), dtype=np.float32)
                    vec = out.mean(axis=0) if out.ndim == 2 else out
                    vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
                except (RuntimeError, ValueError) as exc:  # llama_decode refused the batch: no vector
                    log.warning("could not embed a text of %d characters (%s); it has no vector", len(text), exc)
                    vec = np.zeros(self._llm.n_embd(), dtype=np.float32)
                    computed = False
                with self._lock:
                    if computed:
                        self._recent[text] = vec
                        if len(self._recent) > RECENT_EMBEDDINGS:
                            self._recent.popitem(last=False)
                    if remember:
                        self._cache[text] = vec
                        new += 1
            rows.append(vec)
        if new and self.cache_path is not None:
            with self._lock:
                self._save()
        return np.asarray(rows, dtype=np.float32)

    def _compute(self, text: str) -> Any:
        with self._context:
            self._threads.update(starting=True)
            return self._llm.embed(self._head(text), normalize=False, truncate=True)

    def _head(self, text: str) -> str:
        """``text`` cut to its first ``MAX_EMBED_TOKENS`` tokens."""
        tokens = self._llm.tokenize(text[:4000].encode("utf-8"), add_bos=False)
        if len(tokens) <= MAX_EMBED_TOKENS:
            return text
        return str(self._llm.detokenize(tokens[:MAX_EMBED_TOKENS]).decode("utf-8", errors="ignore"))

    def _save(self) -> None:
        import numpy as np

        assert self.cache_path is not None
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp.npz")
        try:
            np.savez(tmp, texts=np.array(list(self._cache)), vectors=np.array(list(self._cache.values())))
            tmp.replace(self.cache_path)
        except OSError as exc:  # a read-only or full disk: the vectors stay in memory, embedded again next start
            log.warning("cannot write the embedding cache %s: %s", self.cache_path, exc)
            tmp.unlink(missing_ok=True)


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def _on_short_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own that ends when it returns."""
    job = Call(fn)
    thread = threading.Thread(target=job.run, name="compute")
    thread.start()
    thread.join()
    return job.outcome()  # type: ignore[no-any-return]


def _thread_setter(llm: Any) -> Callable[[int, int], None]:
    def apply(n_threads: int, n_threads_batch: int) -> None:
        llm._ctx.set_n_threads(n_threads, n_threads_batch)  # llama_set_n_threads: from the next decode on

    return apply


def _formatter(llm: Any, add_generation_prompt: bool = True) -> Any:
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        # A base model without a template: a plain ChatML layout.
        template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()),
        add_generation_prompt=add_generation_prompt)


def _eog_check(llm: Any) -> Callable[[int], bool]:
    import llama_cpp

    vocab = llm._model.vocab  # the binding exposes no public end-of-generation check
    return lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))

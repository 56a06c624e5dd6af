"""The engine: owns the ``llama_cpp.Llama`` instance, keeps it loaded, runs one generation at a time.

Determinism: before every request the seed is set and the KV cache is reset, so a request's answer never depends
on what was asked before (llama-cpp-python otherwise reuses the cache of a shared prompt prefix, and on CUDA that
was seen to change answers). The prompt is always evaluated from token 0 in ``n_batch`` chunks.

The engine is synchronous; callers run it on a worker thread, never on a network loop or the watchdog thread.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ContextOverflowError, ModelCorruptError
from .models import ModelChoice
from .profiles import Settings

log = logging.getLogger(__name__)

Message = dict[str, str]
FinishReason = Literal["stop", "length", "cancelled", "timeout"]


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

    @property
    def tokens_per_s(self) -> float:
        """Generation speed after the first token."""
        gen_ms = self.total_ms - self.first_token_ms
        return (self.completion_tokens - 1) / (gen_ms / 1000) if self.completion_tokens > 1 and gen_ms > 0 else 0.0


class Engine:
    """A loaded model. Create with ``Engine.load``."""

    def __init__(self, llm: Any, choice: ModelChoice, settings: Settings, sha256: str) -> None:
        self._llm = llm
        self._lock = threading.Lock()
        self.choice = choice
        self.settings = settings
        self.sha256 = sha256
        self.n_ctx: int = int(llm.n_ctx())
        self._formatter = _formatter(llm)
        self._eog = _eog_check(llm)
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
        try:
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=choice.n_ctx,
                n_batch=settings.n_batch,
                n_ubatch=settings.n_ubatch,
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
        return cls(llm, choice, settings, sha256)

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
            return self._run(prompt, sampling, max_tokens, on_text, cancel, deadline)

    def _run(self, prompt: list[int], sampling: Sampling, max_tokens: int,
             on_text: Callable[[str], None] | None, cancel: threading.Event | None,
             deadline: float | None) -> Generation:
        llm = self._llm
        llm.set_seed(sampling.seed)
        llm.reset()  # evaluate the whole prompt from token 0: no answer depends on an earlier request
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        count = 0
        finish: FinishReason = "length"
        t0 = time.monotonic()
        first = 0.0
        gen = llm.generate(prompt, top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
                           temp=sampling.temperature, repeat_penalty=sampling.repeat_penalty, reset=True)
        try:
            for token in gen:
                if not first:
                    first = time.monotonic()
                if self._eog(token):
                    finish = "stop"
                    break
                count += 1
                piece = decoder.decode(llm.detokenize([token], special=False))
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
                if count >= max_tokens:
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                if deadline is not None and time.monotonic() > deadline:
                    finish = "timeout"
                    break
        finally:
            gen.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
        end = time.monotonic()
        return Generation(
            text="".join(pieces),
            prompt_tokens=len(prompt),
            completion_tokens=count,
            finish_reason=finish,
            first_token_ms=((first or end) - t0) * 1000,
            total_ms=(end - t0) * 1000,
        )


def _formatter(llm: Any) -> Any:
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        # A base model without a template: a plain ChatML layout.
        template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))


def _eog_check(llm: Any) -> Callable[[int], bool]:
    import llama_cpp

    vocab = llm._model.vocab  # the binding exposes no public end-of-generation check
    return lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))

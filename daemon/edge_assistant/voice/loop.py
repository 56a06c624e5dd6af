"""The voice loop: listen, hand the question to the scheduler, speak the answer; supervised.

Threads and what they own:

- **voice** (``run``): the only thread that touches the recognizers and ``state``. It reads audio chunks and the
  event queue: push-to-talk (from the MQTT thread) and answers (from the scheduler) arrive as events.
- **inference** (the scheduler's): streams the answer into the sentence splitter and the speaker's queue.
- **speak** (the ``Speaker``'s): synthesizes and plays sentences.

An unexpected error in a step is logged, said through ``on_status``, and the loop starts again after a backoff
(1 s, doubling to 30 s) in a clean state, with the same audio source; a source that fails is opened again.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Config, VoiceConfig
from ..errors import VoiceError
from ..messages import Reply, Request
from .audio import CHUNK_S, Sink, Source
from .recognition import DISTRACTORS, Recognizer, default_vosk_model, load_vosk_model, model_path, normalize
from .synthesis import SentenceSplitter, Speaker, default_piper_voice, load_piper

log = logging.getLogger(__name__)

MIN_UTTERANCE_CHARS = 3
"""Shorter transcripts are fragments (the tail of a wake phrase, a cough), not requests."""
HISTORY = 50
"""Answers and timings kept for ``replies`` and ``timings``."""
BACKOFF_S = (1.0, 30.0)
"""First and longest wait before the loop starts again after an error."""

Event = Callable[[str, dict[str, Any]], None]


class VoiceState(enum.Enum):
    """What the voice loop is doing."""

    IDLE = "idle"
    """Waiting for the wake phrase or push-to-talk."""
    LISTENING = "listening"
    """Transcribing a question."""
    ANSWERING = "answering"
    """The answer is being generated or spoken; only the wake phrase (barge-in) is listened for."""
    RECOVERING = "recovering"
    """After an unexpected error, waiting to start again."""
    STOPPED = "stopped"
    """The source ended or ``stop`` was called."""


class Asker(Protocol):
    """What the loop needs of the scheduler."""

    def submit(self, request: Request, on_reply: Callable[[Reply], None], *, key: str = "",
               on_text: Callable[[str], None] | None = None) -> Any: ...

    def cancel(self, key: str = "") -> bool: ...


class Listener(Protocol):
    """What the loop needs of a recognizer (``recognition.Recognizer``)."""

    def feed(self, pcm: bytes) -> tuple[str, str]: ...

    def flush(self) -> str: ...

    def reset(self) -> None: ...


class Voice(Protocol):
    """What the loop needs of a speaker (``synthesis.Speaker``)."""

    first_audio_at: float | None
    synth_s: float
    audio_s: float

    @property
    def idle(self) -> bool: ...

    def say(self, sentence: str) -> None: ...

    def begin(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Answered:
    key: str
    reply: Reply


class VoiceLoop:
    """Listens, answers and speaks until the source ends or ``stop`` is called. Build with ``VoiceLoop.load``."""

    def __init__(self, cfg: VoiceConfig, persona: str, asker: Asker, source: Source, speaker: Voice,
                 recognizer: Listener, wake: Listener | None, on_event: Event | None = None,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.persona_name = persona
        self.asker = asker
        self.source = source
        self.speaker = speaker
        self.recognizer = recognizer
        self.wake = wake
        self.on_event = on_event or (lambda kind, data: None)
        self.on_status = on_status or (lambda text: None)
        self.state = VoiceState.IDLE
        self._events: queue.Queue[str | _Answered] = queue.Queue()
        self._talk = threading.Event()
        self._stop = threading.Event()
        self._count = 0
        self._answer_key = ""
        self._answered: Reply | None = None
        self._outstanding: set[str] = set()
        self._end_of_speech = 0.0
        self.replies: deque[Reply] = deque(maxlen=HISTORY)
        """The latest answers, newest last."""
        self.timings: deque[dict[str, float]] = deque(maxlen=HISTORY)
        """Per answer: end of speech to first audio, in seconds (-1 when nothing was spoken)."""
        self.restarts = 0
        """How often the loop started again after an error."""

    @classmethod
    def load(cls, cfg: VoiceConfig, config: Config, asker: Asker, source: Source, sink: Sink,
             on_event: Event | None = None, on_status: Callable[[str], None] | None = None) -> VoiceLoop:
        """Load the Vosk model and the Piper voice the persona's languages call for; ``VoiceError`` if missing."""
        name = cfg.persona or config.default_persona
        persona = config.personas.get(name)
        if persona is None:
            raise VoiceError(f"voice.persona: unknown persona {name!r}")
        model = load_vosk_model(model_path(cfg.vosk_models, persona.source_language, default_vosk_model,
                                           "Vosk model"))
        voice = load_piper(model_path(cfg.piper_voices, persona.target_language, default_piper_voice, "Piper voice"))
        recognizer = Recognizer(model, source.rate)
        phrase = normalize(cfg.wake_phrase)
        distractors = list(cfg.wake_distractors or DISTRACTORS.get(persona.source_language, ()))
        wake = Recognizer(model, source.rate, [phrase, *distractors]) if phrase else None
        for rec in (recognizer, wake):  # build the decoding graphs now, not on the first words
            if rec is not None:
                rec.feed(bytes(int(source.rate * CHUNK_S) * 2))
                rec.reset()
        return cls(cfg, name, asker, source, Speaker(voice, sink), recognizer, wake, on_event, on_status)

    # -- from other threads ------------------------------------------------------------------------------------

    def push_to_talk(self) -> None:
        """Start listening now (the MQTT ``listen`` command); handled on the voice thread (repeats coalesce)."""
        if not self._talk.is_set():
            self._talk.set()
            self._events.put("push_to_talk")

    def stop(self) -> None:
        """End the loop after the current chunk; cancel the answer being generated."""
        self._stop.set()
        self._events.put("stop")
        if self._answer_key:
            self.asker.cancel(self._answer_key)
        self.speaker.interrupt()

    # -- the voice thread --------------------------------------------------------------------------------------

    @property
    def _rest_state(self) -> VoiceState:
        return VoiceState.LISTENING if self.cfg.activation == "always" else VoiceState.IDLE

    def run(self) -> None:
        """Process the source until it ends (then let the last answer finish) or ``stop``; restart after errors."""
        self.state = self._rest_state
        delay = BACKOFF_S[0]
        chunks: Iterator[bytes] | None = None
        try:
            while not self._stop.is_set():
                try:
                    if chunks is None:
                        chunks = iter(self.source.chunks())
                    if self._serve(chunks):
                        break
                    delay = BACKOFF_S[0]
                except _SourceError as exc:
                    chunks = None
                    delay = self._recover(exc.__cause__ or exc, delay)
                except Exception as exc:  # noqa: BLE001 (logged with its traceback in _recover)
                    delay = self._recover(exc, delay)
            self._finish_last()
        finally:
            self.state = VoiceState.STOPPED
            self.source.close()
            self.speaker.close()

    def _serve(self, chunks: Iterator[bytes]) -> bool:
        """Consume chunks until the source ends (True) or ``stop`` (True); errors propagate to ``run``."""
        while not self._stop.is_set():
            self._drain_events()
            try:
                pcm = next(chunks)
            except StopIteration:
                return True
            except Exception as exc:
                raise _SourceError(str(exc)) from exc
            self._step(pcm)
            self._settle()
        return True

    def _recover(self, exc: BaseException, delay: float) -> float:
        self.restarts += 1
        self.state = VoiceState.RECOVERING
        log.error("the voice loop failed (%s: %s); starting again in %.0f s", type(exc).__name__, exc, delay,
                  exc_info=exc)
        self.on_status(f"voice: restarting in {delay:.0f} s after an error ({type(exc).__name__}: {exc})")
        if self._answer_key:
            self.asker.cancel(self._answer_key)
            self._answer_key = ""
        self.speaker.interrupt()
        for rec in (self.recognizer, self.wake):
            if rec is not None:
                rec.reset()
        self._stop.wait(delay)
        self.state = self._rest_state
        self.on_status("voice: listening again")
        return min(delay * 2, BACKOFF_S[1])

    def _finish_last(self) -> None:
        """At the end of the input: transcribe what is left and let the last answer be generated and spoken."""
        if self._stop.is_set():
            return
        if self.state == VoiceState.LISTENING:
            text = self.recognizer.flush()
            if text.strip():
                self._final(text)
        while (self._answer_key or self._outstanding) and not self._stop.is_set():
            self._drain_events(block=True)
            self._settle()
        self.speaker.wait(120)

    def _drain_events(self, block: bool = False) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.5) if block else self._events.get_nowait()
            except queue.Empty:
                return
            block = False
            if event == "push_to_talk":
                self._talk.clear()
                if self.state in (VoiceState.IDLE, VoiceState.LISTENING):
                    self.recognizer.reset()
                    self.state = VoiceState.LISTENING
                    self.on_event("listening", {"by": "push_to_talk"})
            elif isinstance(event, _Answered):
                self._on_answered(event)

    def _heard_wake(self, pcm: bytes) -> bool:
        if self.wake is None:
            return False
        partial, final = self.wake.feed(pcm)
        heard = normalize(self.cfg.wake_phrase) in (final or partial)
        if heard:
            self.wake.reset()
        return heard

    def _step(self, pcm: bytes) -> None:
        if self.state == VoiceState.IDLE:
            if self._heard_wake(pcm):
                self.on_event("wake", {"phrase": self.cfg.wake_phrase})
                self.recognizer.reset()
                self.state = VoiceState.LISTENING
            return
        if self.state == VoiceState.ANSWERING:
            if self._heard_wake(pcm):  # barge-in
                log.info("barge-in: the wake phrase during the answer")
                self.on_event("barge_in", {})
                self.asker.cancel(self._answer_key)
                self._answer_key = ""
                self.speaker.interrupt()
                self.recognizer.reset()
                self.state = VoiceState.LISTENING
            return
        partial, final = self.recognizer.feed(pcm)
        if partial:
            self.on_event("partial", {"text": partial})
        if final.strip():
            self._final(final)

    def _final(self, text: str) -> None:
        if len(normalize(text).replace(" ", "")) < MIN_UTTERANCE_CHARS:
            log.info("ignored a fragment of speech: %r", text)
            return
        self.on_event("final", {"text": text})
        self._end_of_speech = time.monotonic()
        self._count += 1
        key = f"voice-{self._count}-{time.monotonic_ns()}"
        self._answer_key, self._answered = key, None
        self.speaker.begin()
        self.state = VoiceState.ANSWERING
        splitter = SentenceSplitter()

        def on_text(piece: str) -> None:  # on the inference thread
            if self._answer_key == key:
                for sentence in splitter.feed(piece):
                    self.speaker.say(sentence)

        def on_reply(reply: Reply) -> None:  # on the inference thread
            if reply.status == "ok" and self._answer_key == key:
                for sentence in splitter.flush():
                    self.speaker.say(sentence)
            self._events.put(_Answered(key, reply))

        self._outstanding.add(key)
        self.asker.submit(Request(text=text, persona=self.persona_name, id=f"voice-{self._count}"), on_reply,
                          key=key, on_text=on_text)

    def _on_answered(self, event: _Answered) -> None:
        reply = event.reply
        self._outstanding.discard(event.key)
        self.replies.append(reply)
        self.on_event("answer", {"id": reply.id, "text": reply.text, "status": reply.status,
                                 "error": reply.error.code if reply.error else None,
                                 "sources": [{"document": s.document, "location": s.location, "excerpt": s.excerpt}
                                             for s in reply.sources]})
        if event.key != self._answer_key:
            return  # an answer interrupted by barge-in
        if reply.status == "refused":
            self.speaker.say(reply.text)
        self._answered = reply

    def _settle(self) -> None:
        """Once the answer is in and spoken, go back to waiting."""
        if self.state != VoiceState.ANSWERING or self._answered is None or not self.speaker.idle:
            return
        first = self.speaker.first_audio_at
        self.timings.append({"end_of_speech_to_first_audio_s": (first - self._end_of_speech) if first else -1.0})
        self._answer_key, self._answered = "", None
        self.state = self._rest_state


class _SourceError(Exception):
    """The audio source raised: it is opened again after the backoff."""

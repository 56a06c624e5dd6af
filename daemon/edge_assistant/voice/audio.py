"""Audio in and out: capture devices, WAV files and raw PCM pipes, resampled to the recognizer's rate."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from ..config import VoiceConfig
from ..errors import VoiceError

log = logging.getLogger(__name__)

CHUNK_S = 0.1
RECOGNIZER_RATE = 16000


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


def open_source(cfg: VoiceConfig) -> Source:
    """The configured audio input."""
    if cfg.input == "wav":
        return WavSource(Path(cfg.input_path), realtime=cfg.input_realtime)
    if cfg.input == "pipe":
        stream = sys.stdin.buffer if cfg.input_path == "-" else Path(cfg.input_path).open("rb")  # noqa: SIM115
        return PipeSource(stream, cfg.input_rate)
    return DeviceSource(cfg.input_device)


def open_sink(cfg: VoiceConfig) -> Sink:
    """The configured audio output."""
    if cfg.output == "wav":
        return WavSink(Path(cfg.output_path))
    if cfg.output == "pipe":
        stream = sys.stdout.buffer if cfg.output_path == "-" else Path(cfg.output_path).open("wb")  # noqa: SIM115
        return PipeSink(stream)
    return DeviceSink(cfg.output_device)

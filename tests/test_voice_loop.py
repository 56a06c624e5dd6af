"""The voice loop in process: fake audio, recognizers and speaker, the real scheduler with a fake generator.

Checks the loop's states, push-to-talk and barge-in as events, recovery after an error, and bounded history. The
same loop with real Vosk and Piper runs in test_voice.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from edge_assistant.config import VoiceConfig
from edge_assistant.pipeline import Runtime
from edge_assistant.scheduler import Scheduler
from edge_assistant.voice import loop as voice_loop
from edge_assistant.voice.loop import VoiceLoop, VoiceState

from fakes import FakeEngine, fake_runtime

END = b"<end>"


class ScriptSource:
    """Chunks from a queue: ``say:<text>`` is an utterance, ``wake`` the wake phrase, anything else silence."""

    rate = 16000

    def __init__(self) -> None:
        self.q: queue.Queue[bytes] = queue.Queue()
        self.opened = 0
        self.fail_next_open = False

    def chunks(self) -> Iterator[bytes]:
        self.opened += 1
        if self.fail_next_open:
            self.fail_next_open = False
            raise OSError("device unplugged")
        while True:  # like a microphone: silence when nobody speaks
            try:
                chunk = self.q.get(timeout=0.01)
            except queue.Empty:
                chunk = b""
            if chunk == END:
                return
            yield chunk

    def close(self) -> None:
        return None


class ScriptRecognizer:
    def __init__(self, wake_only: bool = False) -> None:
        self.wake_only = wake_only
        self.resets = 0

    def feed(self, pcm: bytes) -> tuple[str, str]:
        if pcm == b"boom":
            raise RuntimeError("recognizer crashed")
        if self.wake_only:
            return ("", "hey line") if pcm == b"wake" else ("", "")
        if pcm.startswith(b"say:"):
            return "", pcm[4:].decode()
        return "", ""

    def flush(self) -> str:
        return ""

    def reset(self) -> None:
        self.resets += 1


class FakeSpeaker:
    first_audio_at: float | None = None
    synth_s = 0.0
    audio_s = 0.0

    def __init__(self) -> None:
        self.said: list[str] = []
        self.interrupted = 0

    @property
    def idle(self) -> bool:
        return True

    def say(self, sentence: str) -> None:
        self.said.append(sentence)

    def begin(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def interrupt(self) -> None:
        self.interrupted += 1

    def close(self) -> None:
        return None


class Rig:
    def __init__(self, activation: str = "always", runtime: Runtime | None = None) -> None:
        self.engine = FakeEngine()
        self.scheduler = Scheduler(runtime or fake_runtime(self.engine))
        self.scheduler.start()
        self.source = ScriptSource()
        self.speaker = FakeSpeaker()
        self.events: list[tuple[str, dict[str, object]]] = []
        self.status: list[str] = []
        cfg = VoiceConfig(activation=activation, wake_phrase="hey line")  # type: ignore[arg-type]
        self.loop = VoiceLoop(cfg, "factory", self.scheduler, self.source, self.speaker, ScriptRecognizer(),
                              ScriptRecognizer(wake_only=True), lambda k, d: self.events.append((k, d)),
                              self.status.append)
        self.thread = threading.Thread(target=self.loop.run)

    def feed(self, *chunks: bytes) -> None:
        for c in chunks:
            self.source.q.put(c)

    def finish(self) -> None:
        self.feed(END)
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.scheduler.stop(grace_s=1)

    def wait_answers(self, n: int) -> None:
        """Until ``n`` answers are in and the loop listens again (it is half duplex while answering)."""
        deadline = threading.Event()
        for _ in range(500):
            if self.kinds().count("answer") >= n and self.loop.state != VoiceState.ANSWERING:
                return
            deadline.wait(0.01)
        raise AssertionError(f"{len(self.loop.replies)} answers, state {self.loop.state}")

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(voice_loop, "BACKOFF_S", (0.05, 0.2))


def test_speech_is_answered_and_spoken() -> None:
    rig = Rig()
    rig.thread.start()
    rig.feed(b"say:is the coolant pump running", b"")
    rig.finish()
    assert rig.kinds() == ["final", "answer"]
    assert rig.loop.replies[-1].text == "A echo: is the coolant pump running"
    assert " ".join(rig.speaker.said) == "A echo: is the coolant pump running"
    assert rig.loop.state == VoiceState.STOPPED


def test_an_error_in_a_step_restarts_the_loop_and_speech_after_it_is_answered() -> None:
    rig = Rig()
    rig.thread.start()
    rig.feed(b"boom", b"say:what about the chip conveyor")
    rig.finish()
    assert rig.loop.restarts == 1
    assert any("restarting" in s and "recognizer crashed" in s for s in rig.status)
    assert [r.text for r in rig.loop.replies] == ["A echo: what about the chip conveyor"]


def test_a_failing_source_is_opened_again() -> None:
    rig = Rig()
    rig.source.fail_next_open = True
    rig.thread.start()
    rig.feed(b"say:check the way oil level")
    rig.finish()
    assert rig.source.opened == 2 and rig.loop.restarts == 1
    assert [r.text for r in rig.loop.replies] == ["A echo: check the way oil level"]


def test_an_answer_that_fails_is_reported_and_the_loop_listens_on() -> None:
    rig = Rig()
    rig.engine.fail_on = "explode"
    rig.thread.start()
    rig.feed(b"say:please explode now")
    rig.wait_answers(1)
    rig.feed(b"say:and now a real question")
    rig.finish()
    statuses = [r.status for r in rig.loop.replies]
    codes = [r.error.code if r.error else None for r in rig.loop.replies]
    assert statuses == ["error", "ok"] and codes == ["internal", None]


def test_push_to_talk_arrives_as_an_event() -> None:
    rig = Rig(activation="push_to_talk")
    rig.thread.start()
    rig.feed(b"say:ignored while idle")
    rig.loop.push_to_talk()
    rig.loop.push_to_talk()  # repeats coalesce
    rig.feed(b"", b"say:heard after push to talk")
    rig.finish()
    assert rig.kinds().count("listening") == 1
    assert [r.text for r in rig.loop.replies] == ["A echo: heard after push to talk"]


def test_barge_in_cancels_the_answer() -> None:
    rig = Rig(activation="wake")
    rig.engine.gate = threading.Event()
    rig.thread.start()
    rig.feed(b"wake", b"say:tell me everything about the spindle")
    assert rig.engine.started.wait(5)
    rig.feed(b"wake")
    while "barge_in" not in rig.kinds():
        threading.Event().wait(0.01)
    rig.engine.gate.set()
    rig.finish()
    assert rig.kinds()[:3] == ["wake", "final", "barge_in"]
    assert rig.speaker.interrupted >= 1
    (reply,) = rig.loop.replies
    assert reply.error is not None and reply.error.code == "cancelled"


def test_history_is_bounded() -> None:
    rig = Rig()
    rig.thread.start()
    for i in range(voice_loop.HISTORY + 10):
        rig.feed(f"say:question number {i}".encode())
        rig.wait_answers(i + 1)
    rig.finish()
    assert len(rig.loop.replies) == voice_loop.HISTORY
    assert rig.loop.replies[-1].text.endswith(f"question number {voice_loop.HISTORY + 9}")


def test_a_spoken_answer_from_the_documents_publishes_its_sources(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The answer is spoken; its sources go with the voice answer event (published on the voice answer topic)."""
    from dataclasses import replace

    from edge_assistant.config import KnowledgeConfig
    from edge_assistant.knowledge import Retriever, build_index

    from knowledgekit import make_documents

    kcfg = KnowledgeConfig(paths=(str(make_documents(tmp_path / "docs")),), index=str(tmp_path / "i.sqlite"))
    build_index(kcfg)
    rig = Rig(runtime=replace(fake_runtime(), knowledge=Retriever.open(kcfg)))
    rig.thread.start()
    rig.feed(b"say:what does alarm 1030 mean")
    rig.finish()
    (answer,) = [d for k, d in rig.events if k == "answer"]
    assert answer["status"] == "ok" and str(answer["text"]).startswith("1030 — Chip conveyor overload.")
    assert answer["sources"] == [{"document": "alarms.csv", "location": "row 18 (code 1030)",
                                  "excerpt": rig.loop.replies[-1].sources[0].excerpt}]
    assert " ".join(rig.speaker.said).startswith("1030 — Chip conveyor overload.")

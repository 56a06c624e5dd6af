"""Voice with the real Vosk (Korean) and Piper (English) models; test speech made by espeak-ng."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_assistant import app
from edge_assistant.config import Config, VoiceConfig, load_config
from edge_assistant.errors import VoiceError
from edge_assistant.messages import Request
from edge_assistant.scheduler import Scheduler
from edge_assistant.voice import (
    DeviceSink,
    DeviceSource,
    PipeSource,
    Recognizer,
    SentenceSplitter,
    Speaker,
    VoiceLoop,
    WavSink,
    WavSource,
    default_piper_voice,
    default_vosk_model,
    load_piper,
    load_vosk_model,
)

from conftest import ROOT
from mqttkit import Broker, Client, DaemonProcess, write_config

HANGUL = re.compile(r"[\uac00-\ud7a3]")
WAKE = "안녕하세요"


def say_ko(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", "ko", "-w", str(path), text], check=True)
    return path


def samples(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


def concat(parts: Sequence[Path | float], out: Path) -> Path:
    """WAV files and seconds of silence, end to end, at the first file's rate."""
    rate = 0
    data = []
    for p in parts:
        if isinstance(p, Path):
            s, rate = samples(p)
            data.append(s)
        else:
            data.append(np.zeros(int(p * (rate or 22050)), dtype="<i2"))
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.concatenate(data).tobytes())
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    return {"question": say_ko("컨베이어가 멈췄습니다. 확인해 주세요.", d / "q.wav"),
            "wake": say_ko(WAKE, d / "wake.wav"), "dir": d}


@pytest.fixture(scope="module")
def voice_config(model_path: Path) -> Config:
    return load_config(None, {"model": {"dir": str(model_path.parent)}, "personas": {"talker": {
        "system_prompt": "You are a patient machine-shop trainer. Answer every message with at least six full "
                         "sentences about machine safety.",
        "source_language": "ko", "target_language": "en", "seed": 3,
        "guard": {"strictness": "off"}, "sampling": {"max_tokens": 400}}}})


@pytest.fixture(scope="module")
def voice_scheduler(voice_config: Config) -> Iterator[Scheduler]:
    s = Scheduler(app.load(voice_config, app.plan(voice_config, voice=True)))
    s.start()
    yield s
    s.stop()


def test_bundled_models_are_installed() -> None:
    vosk_model, piper_voice = default_vosk_model("ko"), default_piper_voice("en")
    assert vosk_model is not None and (vosk_model / "am" / "final.mdl").is_file()
    assert piper_voice is not None and piper_voice.is_file()


def test_translator_speech_in_speech_out(speech: dict[str, Path], tmp_path: Path) -> None:
    """The real CLI: Korean speech, Vosk transcript, the translator persona, Piper English speech in a WAV."""
    out = tmp_path / "answer.wav"
    run = subprocess.run([sys.executable, "-m", "edge_assistant.cli", "listen", "--persona", "translator", "--wav",
                          str(speech["question"]), "--out", str(out), "--json"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    finals = [e["text"] for e in result["events"] if e["event"] == "final"]
    answers = [e for e in result["events"] if e["event"] == "answer"]
    assert finals and HANGUL.search(finals[0]), finals  # a Korean transcript
    assert answers and answers[0]["status"] == "ok" and answers[0]["text"]
    assert not HANGUL.search(answers[0]["text"])  # translated out of Korean
    audio, rate = samples(out)
    assert rate == 22050  # the voice's rate (en_US-joe-medium)
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 300  # not silence
    duration = len(audio) / rate
    chars = len(answers[0]["text"])
    assert 0.02 * chars < duration < 0.2 * chars + 1.0, (duration, chars)


def test_sentences_are_spoken_while_generating(voice_scheduler: Scheduler, tmp_path: Path) -> None:
    """The first sentence is synthesized and written before the answer is complete."""
    voice = default_piper_voice("en")
    assert voice is not None
    sink = WavSink(tmp_path / "stream.wav")
    speaker = Speaker(load_piper(voice), sink)
    splitter = SentenceSplitter()
    sentences: list[str] = []

    def on_text(piece: str) -> None:
        for s in splitter.feed(piece):
            sentences.append(s)
            speaker.say(s)

    reply = voice_scheduler.ask(Request(text="Tell me about safety near a lathe.", persona="talker"),
                                on_text=on_text)
    done_generating = time.monotonic()
    for s in splitter.flush():
        speaker.say(s)
    speaker.wait(120)
    speaker.close()
    assert reply.status == "ok" and len(sentences) >= 2
    assert speaker.first_audio_at is not None and speaker.first_audio_at < done_generating
    audio, rate = samples(tmp_path / "stream.wav")
    assert rate == 22050 and len(audio) / rate == pytest.approx(speaker.audio_s, rel=0.01)


@pytest.mark.parametrize(("chunks", "expected"), [
    (["Check the ", "coolant. Then ", "restart the spindle. Done"],
     ["Check the coolant.", "Then restart the spindle."]),
    (["Hi. ", "Ok"], []),  # too short to be worth a separate synthesis
    (["Line one\n", "Line two\n", "x"], ["Line one", "Line two"]),
    (["이러면, " * 12, "끝"], ["이러면, " * 7 + "이러면,"]),  # no sentence end: cut at a comma anyway
])
def test_sentence_splitter(chunks: list[str], expected: list[str]) -> None:
    sp = SentenceSplitter(min_chars=8, max_chars=40)
    got = [s for c in chunks for s in sp.feed(c)]
    assert got == expected


def test_barge_in_stops_playback_and_cancels(voice_config: Config, voice_scheduler: Scheduler,
                                             speech: dict[str, Path], tmp_path: Path) -> None:
    """The wake phrase during the answer: playback stops and the generation is cancelled."""
    audio_in = concat([1.0, speech["wake"], 0.8, speech["question"], 3.0, speech["wake"], 4.0],
                      tmp_path / "in.wav")
    cfg = replace(voice_config.voice, enabled=True, activation="wake", wake_phrase=WAKE, persona="talker",
                  input="wav", input_path=str(audio_in), output="wav", output_path=str(tmp_path / "out.wav"))
    events: list[tuple[float, str, dict[str, object]]] = []
    written: list[int] = []  # the samples the speaker had written when each event came
    sink = WavSink(tmp_path / "out.wav", realtime=True)

    def on_event(kind: str, data: dict[str, object]) -> None:
        events.append((time.monotonic(), kind, data))
        written.append(sink.samples)

    loop = VoiceLoop.load(cfg, voice_config, voice_scheduler, WavSource(audio_in, realtime=True), sink, on_event)
    loop.run()
    kinds = [k for _, k, _ in events]
    assert kinds[0] == "wake" and "final" in kinds and "barge_in" in kinds, kinds
    first_reply = loop.replies[0]
    assert first_reply.status == "error" and first_reply.error is not None
    assert first_reply.error.code == "cancelled"
    assert first_reply.usage is not None and first_reply.usage.completion_tokens < 400  # stopped before its end
    # Playback stopped too: from the barge-in to whatever the loop hears next (the wake phrase's tail may be taken
    # for a new question, which is answered in turn), less than a second more of the first answer is written.
    # (The model sometimes answers the Korean transcript in Korean, which the English voice renders as silence.)
    barge = kinds.index("barge_in")
    nxt = next((i for i in range(barge + 1, len(kinds)) if kinds[i] == "final"), None)
    after = (written[nxt] if nxt is not None else sink.samples) - written[barge]
    assert after / 22050 < 1.0, (after, [k for k in kinds if k != "partial"])


def test_raw_pcm_pipe_input(speech: dict[str, Path], tmp_path: Path) -> None:
    """Raw mono 16-bit PCM at 22050 Hz from a pipe, resampled to the recognizer's 16 kHz."""
    audio, rate = samples(speech["question"])
    model_dir = default_vosk_model("ko")
    assert model_dir is not None
    rec = Recognizer(load_vosk_model(model_dir), 16000)
    producer = subprocess.Popen(["cat", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert producer.stdin is not None and producer.stdout is not None
    stdin = producer.stdin

    def feed() -> None:  # on its own thread: a pipe holds only so much until the reader below drains it
        stdin.write(audio.tobytes() + bytes(rate * 2))  # the speech, then a second of silence
        stdin.close()

    feeder = threading.Thread(target=feed, name="pcm-feeder")
    feeder.start()
    text = ""
    for pcm in PipeSource(producer.stdout, rate).chunks():
        text += rec.feed(pcm)[1]
    text += rec.flush()
    feeder.join(10)
    producer.wait(10)
    assert HANGUL.search(text), text


def test_missing_devices_are_clear_errors() -> None:
    try:
        import sounddevice

        devices = sounddevice.query_devices()
    except (ImportError, OSError):
        devices = []
    if devices:
        pytest.skip("this machine has audio devices")
    with pytest.raises(VoiceError, match="no capture device"):
        DeviceSource()
    with pytest.raises(VoiceError, match="no playback device"):
        DeviceSink()


def test_missing_models_are_clear_errors(voice_config: Config, voice_scheduler: Scheduler, tmp_path: Path) -> None:
    base = VoiceConfig(enabled=True, activation="always", persona="talker", input="wav",
                       input_path=str(tmp_path / "x.wav"), output="wav", output_path=str(tmp_path / "y.wav"))
    src, sink = WavSource(tmp_path / "x.wav"), WavSink(tmp_path / "y.wav")
    with pytest.raises(VoiceError, match="cannot load the Vosk model"):
        VoiceLoop.load(replace(base, vosk_models={"ko": str(tmp_path)}), voice_config, voice_scheduler, src, sink)
    with pytest.raises(VoiceError, match=r"no Piper voice for language 'en' at /nope\.onnx"):
        VoiceLoop.load(replace(base, piper_voices={"en": "/nope.onnx"}), voice_config, voice_scheduler, src, sink)
    with pytest.raises(VoiceError, match="no Vosk model for language 'en'"):
        VoiceLoop.load(replace(base, persona="factory"), voice_config, voice_scheduler, src, sink)  # no English model
    with pytest.raises(VoiceError, match="cannot read the WAV file"):
        list(WavSource(tmp_path / "missing.wav").chunks())


def test_daemon_without_audio_device_keeps_serving(broker: Broker, tmp_path: Path, watcher: Client) -> None:
    cfg = write_config(tmp_path / "c.toml", broker, "vd1",
                       '[voice]\nenabled = true\nactivation = "always"\npersona = "translator"\n')
    watcher.subscribe("edge/vd1/status")
    watcher.subscribe("edge/vd1/reply/v")
    d = DaemonProcess(cfg).start(wait_online=watcher, device="vd1")
    try:
        watcher.publish("edge/vd1/request", json.dumps({"text": "What is a collet?", "max_tokens": 8}),
                        response_topic="edge/vd1/reply/v")
        (reply,) = watcher.wait_for("edge/vd1/reply/v", timeout=60)
        assert reply.json()["status"] == "ok"
        assert "voice is off" in d.text() and "no capture device" in d.text()
        assert "Traceback" not in d.text()
    finally:
        d.stop()


def test_daemon_publishes_transcripts_and_push_to_talk(broker: Broker, tmp_path: Path, watcher: Client,
                                                       speech: dict[str, Path]) -> None:
    """Voice events over MQTT; push-to-talk by the MQTT control command; answers spoken into a WAV."""
    audio_in = concat([4.0, speech["question"], 3.0], tmp_path / "in.wav")
    out = tmp_path / "out.wav"
    cfg = write_config(tmp_path / "c.toml", broker, "vp1",
                       f'[voice]\nenabled = true\nactivation = "push_to_talk"\npersona = "translator"\n'
                       f'input = "wav"\ninput_path = "{audio_in}"\ninput_realtime = true\noutput = "wav"\n'
                       f'output_path = "{out}"\n')
    watcher.subscribe("edge/vp1/status")
    watcher.subscribe("edge/vp1/voice/#")
    d = DaemonProcess(cfg).start(wait_online=watcher, device="vp1")
    try:
        watcher.publish("edge/vp1/control", "listen")
        (final,) = watcher.wait_for("edge/vp1/voice/final", timeout=120)
        assert HANGUL.search(final.json()["text"])
        (answer,) = watcher.wait_for("edge/vp1/voice/answer", timeout=120)
        assert answer.json()["status"] == "ok"
        assert watcher.on("edge/vp1/voice/listening")
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert out.exists()
    finally:
        d.stop()
    assert "Traceback" not in d.text()


def test_voice_never_blocks_mqtt(broker: Broker, tmp_path: Path, watcher: Client, speech: dict[str, Path]) -> None:
    """While realtime voice input is recognized and answered, MQTT requests and health messages keep flowing."""
    audio_in = concat([1.0] + [speech["question"], 2.0] * 4, tmp_path / "in.wav")
    cfg = write_config(tmp_path / "c.toml", broker, "vr1",
                       f'[voice]\nenabled = true\nactivation = "always"\npersona = "translator"\n'
                       f'input = "wav"\ninput_path = "{audio_in}"\ninput_realtime = true\noutput = "wav"\n'
                       f'output_path = "{tmp_path / "out.wav"}"\n')
    watcher.subscribe("edge/vr1/status")
    watcher.subscribe("edge/vr1/health")
    watcher.subscribe("edge/vr1/voice/#")
    watcher.subscribe("edge/vr1/reply/r")
    d = DaemonProcess(cfg).start(wait_online=watcher, device="vr1")
    try:
        watcher.wait_for("edge/vr1/voice/final", timeout=60)  # voice is busy now
        watcher.publish("edge/vr1/request", json.dumps({"text": "Is the coolant pump running?", "max_tokens": 10}),
                        response_topic="edge/vr1/reply/r")
        (reply,) = watcher.wait_for("edge/vr1/reply/r", timeout=120)
        assert reply.json()["status"] == "ok"
        # Voice carries on after the MQTT answer: a spoken answer comes later still.
        later = watcher.wait_for("edge/vr1/voice/answer", lambda m: m.received > reply.received, timeout=120)[0]
        first = watcher.on("edge/vr1/voice/final")[0]
        during = [h for h in watcher.on("edge/vr1/health") if first.received < h.received < later.received]
        assert len(during) >= 2  # health kept coming while voice ran
    finally:
        d.stop()


"""The MQTT service in process: a fake paho client through the seam, the real scheduler with a fake generator.

Checks what a client would see on the wire: one final reply per request (errors included) to its response topic
with its correlation data, the ack only after the reply, ids and personas echoed, stored replies for repeats.
The same paths against a real Mosquitto and the real model are in test_mqtt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_assistant.messages import Reply
from edge_assistant.mqtt import MqttService
from edge_assistant.replystore import ReplyStore, SqliteReplies
from edge_assistant.scheduler import Scheduler

from fakes import FakeClient, FakeEngine, FakeMessage, FakeProps, fake_config, fake_runtime

REQ = "edge/dev1/request"
REPLY = "edge/dev1/reply/t"


class Rig:
    def __init__(self, stream_window_ms: float = 0.0, store: ReplyStore | None = None,
                 plc_topic: str = "plant/+/alarm") -> None:
        self.engine = FakeEngine()
        config = fake_config(device_id="dev1", mqtt={"enabled": True, "discovery": False,
                                                     "stream_window_ms": stream_window_ms},
                             plc=[{"topic": plc_topic}])
        self.scheduler = Scheduler(fake_runtime(self.engine, config), queue_size=4, store=store)
        self.scheduler.start()
        self.client = FakeClient()
        self.controls: list[str] = []
        self.service = MqttService(config, self.scheduler, on_control=self.controls.append,
                                   make_client=lambda: self.client)  # type: ignore[arg-type,return-value]
        self.mid = 0

    def send(self, payload: bytes | str, topic: str = REQ, response_topic: str = REPLY,
             correlation: bytes | None = None, mid: int | None = None, dup: bool = False) -> int:
        if mid is None:
            self.mid += 1
            mid = self.mid
        raw = payload.encode() if isinstance(payload, str) else payload
        msg = FakeMessage(topic, raw, mid, 1, FakeProps(response_topic, correlation), dup=dup)
        self.service._on_message(self.client, None, msg)  # type: ignore[arg-type]
        return mid

    def finals(self, topic: str = REPLY) -> list[dict[str, Any]]:
        return [json.loads(p.payload) for p in self.client.on(topic) if json.loads(p.payload).get("done")]

    def wait_acks(self, n: int) -> None:
        self.client.wait(lambda: len(self.client.acks) >= n)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.scheduler.stop(grace_s=1)


def test_reply_with_correlation_then_ack(rig: Rig) -> None:
    mid = rig.send('{"text": "What is a collet?", "id": "r1"}', correlation=b"\x01\x02")
    rig.wait_acks(1)
    (reply,) = [p for p in rig.client.on(REPLY)]
    body = json.loads(reply.payload)
    assert body["status"] == "ok" and body["id"] == "r1" and body["done"] is True
    assert reply.properties.CorrelationData == b"\x01\x02"
    assert rig.client.acks == [mid]
    assert json.loads(rig.client.on("edge/dev1/answer")[0].payload)["id"] == "r1"


def test_bad_request_error_echoes_id_and_persona_and_stays_off_the_answer_topic(rig: Rig) -> None:
    rig.send('{"text": "hi", "id": "nr-7", "colour": "red"}', topic=REQ + "/translator")
    rig.wait_acks(1)
    (body,) = rig.finals()
    assert body["status"] == "error" and body["error"]["code"] == "bad_request"
    assert body["id"] == "nr-7" and body["persona"] == "translator"
    assert rig.client.on("edge/dev1/answer") == []


def test_an_internal_error_is_answered_and_acked(rig: Rig) -> None:
    rig.engine.fail_on = "explode"
    rig.send('{"text": "please explode", "id": "x1"}')
    rig.wait_acks(1)
    (body,) = rig.finals()
    assert body["status"] == "error" and body["error"]["code"] == "internal" and body["id"] == "x1"
    assert body["persona"] == "factory"


def test_fixed_correlation_data_with_new_questions_gets_new_answers(rig: Rig) -> None:
    """A Node-RED node with a typed-in correlation data: each new question is answered."""
    rig.send("What is a collet?", correlation=b"fixed")
    rig.send("What is coolant for?", correlation=b"fixed")
    rig.send("What is a collet?", correlation=b"fixed")  # asked again: the stored reply, not a new run
    rig.wait_acks(3)
    texts = sorted(b["text"] for b in rig.finals())
    assert texts == ["A echo: What is a collet?", "A echo: What is a collet?", "A echo: What is coolant for?"]
    assert rig.engine.calls == ["What is a collet?", "What is coolant for?"]


def test_redelivery_while_running_is_answered_once_and_both_acked(rig: Rig) -> None:
    import threading

    rig.engine.gate = threading.Event()
    payload = '{"text": "slow one", "id": "d1"}'
    rig.send(payload, mid=41)
    assert rig.engine.started.wait(5)
    rig.send(payload, mid=41, dup=True)  # the broker's redelivery after a reconnect
    rig.engine.gate.set()
    rig.wait_acks(2)
    assert len(rig.finals()) == 1 and rig.client.acks == [41, 41]


def test_a_redelivered_copy_of_an_answered_request_is_only_acknowledged(rig: Rig) -> None:
    """The reply already went out (paho re-sends it after a reconnect); the broker's redelivered request only
    needs its ack."""
    payload = '{"text": "q", "id": "d2"}'
    rig.send(payload, mid=7)
    rig.wait_acks(1)
    rig.send(payload, mid=7, dup=True)
    rig.wait_acks(2)
    assert len(rig.finals()) == 1 and rig.engine.calls == ["q"]


def test_forbidden_response_topic_gets_nothing_there(rig: Rig) -> None:
    rig.send('{"text": "hi", "id": "f"}', response_topic="elsewhere/steal")
    assert rig.client.on("elsewhere/steal") == [] and rig.client.on("edge/dev1/answer") == []
    assert rig.client.acks == [1]


def test_a_reply_never_goes_to_a_plc_alarm_topic_the_daemon_listens_to() -> None:
    """A PLC route under the reply prefix: a request asking for its reply there gets nothing there (the reply would
    come back as a new alarm)."""
    rig = Rig(plc_topic="edge/plc/+/alarm")
    try:
        rig.send('{"text": "hi", "id": "loop"}', response_topic="edge/plc/gw1/alarm")
        rig.wait_acks(1)
        assert rig.client.on("edge/plc/gw1/alarm") == [] and rig.client.acks == [1]
        rig.send('{"text": "hi", "id": "ok"}')
        rig.wait_acks(2)
        assert [r["id"] for r in rig.finals()] == ["ok"]
    finally:
        rig.scheduler.stop(grace_s=1)


def test_full_queue_says_busy_to_the_client(rig: Rig) -> None:
    import threading

    rig.engine.gate = threading.Event()
    rig.send('{"text": "running", "id": "r"}')
    assert rig.engine.started.wait(5)
    for i in range(5):
        rig.send(json.dumps({"text": f"q{i}", "id": f"q{i}"}))
    busy = [b for b in rig.finals() if b["error"] and b["error"]["code"] == "busy"]
    assert [b["id"] for b in busy] == ["q4"]
    rig.engine.gate.set()
    rig.wait_acks(6)
    assert sorted(b["id"] for b in rig.finals()) == ["q0", "q1", "q2", "q3", "q4", "r"]


def test_control_commands(rig: Rig) -> None:
    rig.send("listen", topic="edge/dev1/control", response_topic="")
    assert rig.controls == ["listen"]
    rig.send("nonsense", topic="edge/dev1/control", response_topic="")
    assert rig.controls == ["listen"] and rig.client.acks == [1, 2]


def test_plc_alarm_explained_on_its_reply_topic(rig: Rig) -> None:
    rig.send('{"tag": "TT-101", "value": 92, "unit": "degC", "alarm": "spindle hot"}', topic="plant/gw1/alarm",
             response_topic="")
    rig.wait_acks(1)
    (body,) = rig.finals("plant/gw1/alarm/explanation")
    assert body["status"] == "ok" and "spindle hot" in body["text"]


EXPLAINED = "plant/gw1/alarm/explanation"
SPINDLE = '{"id": 17, "tag": "TT-101", "value": 92, "unit": "degC", "alarm": "spindle hot"}'
COOLANT = '{"id": 17, "tag": "PT-7", "value": 0.4, "unit": "bar", "alarm": "coolant low"}'


def alarm_once(replies: Path, payload: str) -> tuple[dict[str, Any], list[str]]:
    """One daemon life with its replies stored in ``replies``: the alarm sent once; its explanation and what the
    model was asked."""
    store = SqliteReplies(replies)
    rig = Rig(store=store)
    try:
        rig.send(payload, topic="plant/gw1/alarm", response_topic="")
        rig.wait_acks(1)
        (body,) = rig.finals(EXPLAINED)
        return body, rig.engine.calls
    finally:
        rig.scheduler.stop(grace_s=1)
        store.close()


def test_plc_alarm_reusing_an_id_after_a_restart_is_explained_anew(tmp_path: Path) -> None:
    """A gateway whose alarm counter restarted sends id 17 again for another alarm: it gets that alarm's
    explanation, not the one stored for the old id 17. The same alarm delivered again gets its stored reply."""
    path = tmp_path / "replies.sqlite"
    first, calls = alarm_once(path, SPINDLE)
    assert "spindle hot" in first["text"] and len(calls) == 1
    again, calls = alarm_once(path, SPINDLE)  # after a restart: the broker delivered it again
    assert again == first and calls == []
    new, calls = alarm_once(path, COOLANT)  # after another restart: the same id, a new alarm
    assert new["id"] == "17" and "coolant low" in new["text"] and "spindle hot" not in new["text"]
    assert len(calls) == 1


def test_plc_reply_stored_under_the_old_key_form_is_not_replayed(tmp_path: Path) -> None:
    """A state directory from before the key held the alarm (``plc|<id>``): its replies are never sent for an
    alarm, whatever its id."""
    path = tmp_path / "replies.sqlite"
    old = SqliteReplies(path)
    old.put("plc|17", Reply(id="17", status="ok", text="Stale: spindle hot", persona="factory"))
    old.close()
    body, calls = alarm_once(path, COOLANT)
    assert "coolant low" in body["text"] and "Stale" not in body["text"] and len(calls) == 1


def test_streamed_chunks_then_final_with_seq(rig: Rig) -> None:
    rig.send('{"text": "one two three", "id": "s", "stream": true}')
    rig.wait_acks(1)
    bodies = [json.loads(p.payload) for p in rig.client.on(REPLY)]
    chunks = [b for b in bodies if b["done"] is False]
    assert "".join(c["chunk"] for c in chunks) == bodies[-1]["text"]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1)) and bodies[-1]["seq"] == len(chunks) + 1


def test_streamed_pieces_are_joined_into_fewer_chunks_the_first_at_once() -> None:
    """With a window longer than the whole answer, the first piece leaves alone and the rest in one chunk, before
    the final reply; nothing is lost or reordered."""
    rig = Rig(stream_window_ms=5000)
    try:
        rig.send('{"text": "one two three four", "id": "w", "stream": true}')
        rig.wait_acks(1)
        bodies = [json.loads(p.payload) for p in rig.client.on(REPLY)]
        chunks = [b for b in bodies if b["done"] is False]
        assert len(chunks) == 2 and chunks[0]["chunk"] == "A"  # the fake engine's first word
        assert "".join(c["chunk"] for c in chunks) == bodies[-1]["text"] and bodies[-1]["seq"] == 3
    finally:
        rig.scheduler.stop(grace_s=1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                     st.sampled_from(["text", "id", "persona", "stream", "max_tokens", "temperature", "x"]), kids,
                     max_size=5), max_leaves=12).map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=4000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([b'{"text": "\\ud800"}', b'{"text": "a", "id": "\\udfff"}', b'{"text": "a", "max_tokens": 1'
                     + b"9" * 5000 + b"}", b'{"text": "a", "temperature": 1' + b"0" * 400 + b"}"]),
))
def test_fuzzed_payloads_each_get_exactly_one_final_reply(payload: bytes) -> None:
    rig = Rig()
    try:
        rig.send(payload, correlation=b"c")
        rig.wait_acks(1)
        finals = rig.finals()
        assert len(finals) == 1, finals
        assert finals[0]["status"] in ("ok", "error", "refused")
    finally:
        rig.scheduler.stop(grace_s=1)


def test_busy_and_queue_depth_are_published_when_they_change(rig: Rig) -> None:
    """Retained on their own topic at every change, so even a short generation shows as busy in Home Assistant."""
    rig.send('{"text": "one two", "id": "b1"}')
    rig.wait_acks(1)
    rig.client.wait(lambda: json.loads(rig.client.on("edge/dev1/state")[-1].payload) == {"busy": False,
                                                                                        "queue_depth": 0})
    states = [json.loads(p.payload) for p in rig.client.on("edge/dev1/state")]
    assert {"busy": True, "queue_depth": 0} in states
    assert all(p.retain for p in rig.client.on("edge/dev1/state"))


def test_health_and_state_are_published_on_connect(rig: Rig) -> None:
    """After a restart the sensors show this process's figures at once, not the last process's for 30 s."""
    from types import SimpleNamespace

    rig.service._on_connect(rig.client, None, SimpleNamespace(session_present=False),  # type: ignore[arg-type]
                            SimpleNamespace(is_failure=False), None)
    (health,) = rig.client.on("edge/dev1/health")
    assert health.retain and json.loads(health.payload)["busy"] is False
    assert json.loads(rig.client.on("edge/dev1/state")[-1].payload) == {"busy": False, "queue_depth": 0}
    assert rig.client.on("edge/dev1/status")[-1].payload == b"online"


def test_short_drops_name_a_client_id_clash() -> None:
    from edge_assistant.mqtt import ShortDrops

    now = [0.0]
    drops = ShortDrops(within_s=5.0, after=3, clock=lambda: now[0])
    seen = []
    for gap in (1.0, 1.0, 1.0, 1.0):  # connected, then closed a second later, again and again
        drops.connected()
        now[0] += gap
        seen.append(drops.dropped())
    assert seen == [False, False, True, False]  # said once per streak
    drops.connected()
    now[0] += 60.0  # a long-lived connection that drops is an ordinary outage: the streak starts again
    assert not drops.dropped() and drops.streak == 0

"""Conversation memory without the model: its bounds (turns, idle time, least recently used), its files (round trip,
atomic writes, a corrupt file), the [conversations] config, and the protocol's conversation fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from edge_assistant import protocol
from edge_assistant.config import ConversationsConfig, load_config
from edge_assistant.conversations import Conversations, Turn, digest_of, file_name, read_conversation
from edge_assistant.errors import BadRequestError, ConfigError
from edge_assistant.messages import Reply
from edge_assistant.mqtt import MqttService
from edge_assistant.scheduler import Scheduler

from fakes import FakeClient, FakeEngine, FakeMessage, FakeProps, fake_config, fake_runtime


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def turn(n: int) -> Turn:
    """An answered turn; an even one continues the subject an earlier question named."""
    return Turn(f"question {n}", f"answer {n}", (("alarms.csv", f"row {n}"),), (f"A{n}",), ("coolant",),
                "What does alarm 2014 mean?" if n % 2 == 0 else "")


def ask(store: Conversations, name: str, n: int) -> int:
    """One answered turn in ``name``; its number."""
    ctx = store.begin(name)
    store.finish(name, turn(n))
    return ctx.turn


def test_a_conversation_keeps_its_last_turns_and_counts_every_request() -> None:
    store = Conversations(ConversationsConfig(max_turns=3))
    numbers = [ask(store, "panel-1", n) for n in range(1, 6)]
    ctx = store.begin("panel-1")
    store.finish("panel-1", None)  # refused: counted, not kept
    assert numbers == [1, 2, 3, 4, 5] and ctx.turn == 6
    assert [t.question for t in ctx.history] == ["question 3", "question 4", "question 5"]
    assert ctx.previous == turn(5)
    again = store.begin("panel-1")
    assert again.turn == 7 and again.history == ctx.history  # the refused turn left nothing behind


def test_an_idle_conversation_is_forgotten() -> None:
    clock = Clock()
    store = Conversations(ConversationsConfig(idle_s=60), clock=clock)
    ask(store, "a", 1)
    clock.now += 59
    assert store.begin("a").turn == 2
    store.finish("a", turn(2))
    clock.now += 61
    fresh = store.begin("a")
    assert fresh.turn == 1 and fresh.history == ()


def test_the_least_recently_continued_conversation_goes_first() -> None:
    clock = Clock()
    store = Conversations(ConversationsConfig(max_conversations=2), clock=clock)
    ask(store, "a", 1)
    clock.now += 1
    ask(store, "b", 1)
    clock.now += 1
    ask(store, "a", 2)  # a is now the more recent
    clock.now += 1
    ask(store, "c", 1)  # b goes
    assert len(store) == 2
    assert store.get("b") is None
    conv = store.get("a")
    assert conv is not None and [t.question for t in conv.turns] == ["question 1", "question 2"]


def test_forget_ends_a_conversation() -> None:
    store = Conversations()
    ask(store, "a", 1)
    assert store.forget("a") is True and store.forget("a") is False
    assert store.begin("a").turn == 1


def test_every_part_of_a_turn_is_bounded() -> None:
    store = Conversations()
    store.begin("a")
    store.finish("a", Turn("q" * 50_000, "a" * 50_000, tuple(("d", str(i)) for i in range(100)),
                      tuple(f"A{i}" for i in range(100)), tuple("t" * 500 for _ in range(100))))
    conv = store.get("a")
    assert conv is not None
    (kept,) = conv.turns
    assert len(kept.question) == len(kept.answer) == 4000
    assert len(kept.sources) == len(kept.identifiers) == len(kept.terms) == 16 and len(kept.terms[0]) == 64


def test_conversations_survive_a_restart_and_expiry_holds_across_it(tmp_path: Path) -> None:
    clock = Clock()
    cfg = ConversationsConfig(max_turns=4, idle_s=600)
    store = Conversations(cfg, tmp_path, clock=clock)
    ask(store, "panel/1 \u00e9", 1)  # any character: the file is named by a digest
    ask(store, "panel/1 \u00e9", 2)
    ask(store, "old", 1)
    clock.now += 300
    ask(store, "panel/1 \u00e9", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([file_name("panel/1 \u00e9"), file_name("old")])
    clock.now += 400  # "old" has been idle 700 s, past idle_s; the panel 400 s
    again = Conversations(cfg, tmp_path, clock=clock)
    assert again.get("old") is None and not (tmp_path / file_name("old")).exists()
    ctx = again.begin("panel/1 \u00e9")
    assert ctx.turn == 4 and [t.question for t in ctx.history] == ["question 1", "question 2", "question 3"]
    assert ctx.history[:2] == (turn(1), turn(2))  # sources, identifiers, terms and subject read back as they were
    assert ctx.digest == digest_of([turn(1), turn(2), turn(3)])


def test_a_restart_with_fewer_conversations_allowed_keeps_the_most_recent(tmp_path: Path) -> None:
    clock = Clock()
    store = Conversations(ConversationsConfig(), tmp_path, clock=clock)
    for name in ("a", "b", "c"):
        clock.now += 1
        ask(store, name, 1)
    again = Conversations(ConversationsConfig(max_conversations=2, max_turns=1), tmp_path, clock=clock)
    assert again.get("a") is None and again.get("b") is not None and again.get("c") is not None
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_write_leaves_no_temporary_file_and_a_killed_one_is_cleared(tmp_path: Path) -> None:
    store = Conversations(ConversationsConfig(), tmp_path)
    ask(store, "a", 1)
    assert [p.name for p in tmp_path.iterdir()] == [file_name("a")]
    (tmp_path / f".{file_name('a')}.tmp").write_text('{"format": 1, "na')  # a write cut short by a kill
    again = Conversations(ConversationsConfig(), tmp_path)
    assert again.begin("a").turn == 2 and [p.name for p in tmp_path.iterdir()] == [file_name("a")]


@pytest.mark.parametrize("content", [b"{\"format\": 1, \"name\": \"a\", \"asked\"", b"\xff\xfe garbage", b"[]",
                                     b'{"format": 1, "name": "a", "asked": 1, "used": 5, "turns": [{"question": 3}]}'])
def test_a_corrupt_file_is_logged_set_aside_and_its_conversation_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes) -> None:
    store = Conversations(ConversationsConfig(), tmp_path)
    ask(store, "a", 1)
    ask(store, "b", 1)
    (tmp_path / file_name("a")).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edge_assistant.conversations"):
        again = Conversations(ConversationsConfig(), tmp_path)
    (line,) = [r.getMessage() for r in caplog.records]
    assert file_name("a") in line and "cannot be read" in line and "starts empty" in line
    assert again.get("a") is None and again.begin("a").turn == 1
    assert again.get("b") is not None  # the others are whole
    assert (tmp_path / file_name("a").replace(".json", ".corrupt")).is_file()


def test_a_store_that_cannot_write_keeps_conversations_in_memory(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="edge_assistant.conversations"):
        store = Conversations(ConversationsConfig(), blocked / "conversations")
    assert "kept in memory only" in caplog.text
    assert ask(store, "a", 1) == 1 and ask(store, "a", 2) == 2


def test_read_conversation_reads_one_file_without_a_store(tmp_path: Path) -> None:
    store = Conversations(ConversationsConfig(), tmp_path)
    ask(store, "a", 7)
    conv = read_conversation(tmp_path, "a")
    assert conv is not None and conv.turns == (turn(7),) and conv.asked == 1
    assert read_conversation(tmp_path, "nobody") is None
    assert json.loads((tmp_path / file_name("a")).read_text())["name"] == "a"


def test_conversations_config_is_validated_naming_the_key() -> None:
    cfg = load_config(None, {"conversations": {"max_turns": 3, "idle_s": 90, "max_conversations": 10}})
    assert cfg.conversations == ConversationsConfig(max_turns=3, idle_s=90.0, max_conversations=10)
    for bad, key in (({"max_turns": 0}, "max_turns"), ({"idle_s": 0}, "idle_s"),
                     ({"max_conversations": "many"}, "max_conversations"), ({"turns": 3}, "turns")):
        with pytest.raises(ConfigError, match=rf"conversations\.{key}"):
            load_config(None, {"conversations": bad})


# --- the protocol ---------------------------------------------------------------------------------------------------

TOPICS = protocol.Topics("edge", "dev1")


def parse(body: dict[str, Any]) -> protocol.Incoming:
    return protocol.parse(TOPICS, "edge/dev1/request", json.dumps(body).encode(), max_bytes=4096,
                          allowed_prefix="edge/")


def test_conversation_and_forget_are_read_from_the_json_body() -> None:
    req = parse({"text": "How do I clear it?", "conversation": "panel-7", "reply_to": "edge/dev1/reply/p7"}).request
    assert (req.conversation, req.forget, req.text) == ("panel-7", False, "How do I clear it?")
    forget = parse({"conversation": "panel-7", "forget": True}).request  # no text: only the end of it
    assert (forget.conversation, forget.forget, forget.text) == ("panel-7", True, "")
    alone = parse({"text": "What does alarm 2014 mean?"}).request
    assert (alone.conversation, alone.forget) == ("", False)


@pytest.mark.parametrize(("body", "field"), [
    ({"text": "q", "conversation": ""}, "conversation"),
    ({"text": "q", "conversation": "x" * 65}, "conversation"),
    ({"text": "q", "conversation": "   "}, "conversation"),
    ({"text": "q", "conversation": 7}, "conversation"),
    ({"text": "q", "conversation": "a\u0007b"}, "conversation"),
    ({"text": "q", "forget": True}, "forget"),
    ({"text": "q", "conversation": "c", "forget": "yes"}, "forget"),
    ({"conversation": "c"}, "text"),
    ({"conversation": "c", "forget": False}, "text"),
])
def test_bad_conversation_values_are_bad_requests_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestError, match=f"field '{field}'") as info:
        parse(body)
    assert info.value.code == "bad_request"


def test_the_longest_conversation_name_is_accepted() -> None:
    assert parse({"text": "q", "conversation": "x" * 64}).request.conversation == "x" * 64


def test_a_reply_in_a_conversation_echoes_it_and_one_alone_has_no_such_keys() -> None:
    alone = Reply(id="1", status="ok", text="Top up the coolant.", persona="factory")
    body = json.loads(protocol.reply_payload(alone, 65536))
    assert "conversation" not in body and "turn" not in body
    assert protocol.reply_payload(alone, 65536) == protocol.reply_payload(
        Reply(id="1", status="ok", text="Top up the coolant.", persona="factory"), 65536)
    in_conv = Reply(id="1", status="ok", text="Top up the coolant.", persona="factory", conversation="p7", turn=2)
    body = json.loads(protocol.reply_payload(in_conv, 65536))
    assert (body["conversation"], body["turn"]) == ("p7", 2)
    answer = json.loads(protocol.answer_payload(in_conv, 65536))
    assert (answer["conversation"], answer["turn"]) == ("p7", 2)
    assert "conversation" not in json.loads(protocol.answer_payload(alone, 65536))
    cut = json.loads(protocol.reply_payload(Reply(id="1", status="ok", text="x" * 5000, conversation="p7", turn=3,
                                                  provenance={"k": "v" * 5000}), 1024))
    assert cut["truncated"] is True and (cut["conversation"], cut["turn"]) == ("p7", 3)


def test_a_refused_request_echoes_its_conversation_where_it_is_valid() -> None:
    assert protocol.salvage_conversation(b'{"conversation": "p7", "max_tokens": -1}', 4096) == "p7"
    assert protocol.salvage_conversation(json.dumps({"conversation": "x" * 65}).encode(), 4096) == ""
    assert protocol.salvage_conversation(b'{"conversation": 5}', 4096) == ""
    assert protocol.salvage_conversation(b"not json", 4096) == ""


def test_replies_from_outside_the_pipeline_echo_the_conversation_too() -> None:
    """An internal error (the scheduler's reply) and a bad request (the transport's) name the conversation, where
    the request named a valid one, so a panel can put the reply in its place."""
    engine = FakeEngine()
    engine.fail_on = "explode"
    config = fake_config(device_id="dev1", mqtt={"enabled": True, "discovery": False})
    scheduler = Scheduler(fake_runtime(engine, config))
    scheduler.start()
    client = FakeClient()
    service = MqttService(config, scheduler, make_client=lambda: client)  # type: ignore[arg-type,return-value]
    try:
        for mid, body in enumerate(({"text": "please explode", "conversation": "p7"},
                                    {"text": "hi", "conversation": "p7", "max_tokens": 0}), 1):
            msg = FakeMessage("edge/dev1/request", json.dumps(body).encode(), mid, 1, FakeProps("edge/dev1/reply/t"))
            service._on_message(client, None, msg)  # type: ignore[arg-type]
        client.wait(lambda: len(client.acks) >= 2)
        finals = [json.loads(p.payload) for p in client.on("edge/dev1/reply/t")]
        assert sorted((b["error"]["code"], b["conversation"]) for b in finals) == [("bad_request", "p7"),
                                                                                   ("internal", "p7")]
    finally:
        scheduler.stop(grace_s=1)

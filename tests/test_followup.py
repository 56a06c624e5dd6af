"""Follow-ups without the model: what a question in a conversation is retrieved with and why (scripted retrieval),
what a turn is remembered as, and the pipeline's conversation path with a fake engine: turn numbers, forget, the
earlier turns in the chat messages within the context budget, the guard with its context, provenance."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from edge_assistant import followup, pipeline
from edge_assistant.conversations import Context, Conversations, Turn
from edge_assistant.guard import ALLOW, Relevance, Verdict
from edge_assistant.knowledge import Choice, Found
from edge_assistant.knowledge.answer import THRESHOLD as T
from edge_assistant.knowledge.units import Unit
from edge_assistant.messages import Generation, Message, Passage, Request, Sampling
from edge_assistant.pipeline import Runtime, handle
from edge_assistant.scheduler import Scheduler

from fakes import FakeEngine, fake_config, fake_runtime

ROW_2014 = Passage("alarms.csv", "row 10 (Code 2014)", "Code: 2014\nMessage: COOLANT LEVEL LOW\nCause: The coolant "
                   "is below the float switch B31\nAction: Top up with ready-mixed emulsion", 0.0, 1.0, "identifier",
                   "2014", "row")
SECTION = Passage("maintenance_manual.md", "section Manual > 4 Procedures > 4.1 Changing the coolant",
                  "Manual > 4 Procedures > 4.1 Changing the coolant\n1. Switch the main switch OFF.", 0.1, 0.0,
                  "words", "", "section")


def found(*passages: Passage, by_identifier: bool = False, unknown_identifier: bool = False,
          known: Sequence[str] = ()) -> Found:
    return Found(tuple(passages), (), {}, frozenset(known), by_identifier, unknown_identifier)


def choice(score: float, supported: bool, passage: int = 0) -> Choice:
    return Choice("answer", passage, Unit("answer", "", 0, "sentence"), score, 1.0, 0.0, score, supported)


def scripted(results: dict[str, tuple[Found, Choice | None]]) -> tuple[followup.Look, list[str]]:
    """A retrieval that answers each query from ``results`` (nothing found otherwise), and the queries it got."""
    asked: list[str] = []

    def look(text: str) -> tuple[Found, Choice | None]:
        asked.append(text)
        return results.get(text, (found(), None))

    return look, asked


ALARM_TURN = Turn("What does alarm 2014 mean?", "2014 — COOLANT LEVEL LOW.", (("alarms.csv", "row 10 (Code 2014)"),),
                  ("2014",), ("alarm", "coolant", "level", "low"))
CARRIED = "How do I clear it? 2014 alarm coolant level low"


def test_the_first_turn_is_retrieved_alone() -> None:
    look, asked = scripted({})
    plan = followup.plan("What does alarm 2014 mean?", None, look)
    assert asked == ["What does alarm 2014 mean?"] and plan.carried == () and "first turn" in plan.why


def test_a_follow_up_that_finds_nothing_alone_carries_the_last_subject() -> None:
    look, asked = scripted({
        "How do I clear it?": (found(SECTION), choice(T - 1.0, False)),
        CARRIED: (found(ROW_2014, by_identifier=True), choice(T - 0.5, True)),
    })
    plan = followup.plan("How do I clear it?", ALARM_TURN, look)
    assert asked == ["How do I clear it?", CARRIED]
    assert plan.query == CARRIED and plan.carried == ("2014", "alarm", "coolant", "level", "low")
    assert plan.found.passages == (ROW_2014,) and plan.covered
    assert plan.why.startswith("continues the last turn's subject: alone it finds no answer")
    assert f"score {T - 1.0:.3f}" in plan.why and f"score {T - 0.5:.3f}" in plan.why


def test_a_follow_up_whose_answer_scores_higher_with_the_last_subject_carries_it() -> None:
    look, _ = scripted({
        "What gloves do I wear for that?": (found(SECTION), choice(T + 0.5, True)),
        "What gloves do I wear for that? 2014 alarm coolant level low": (found(ROW_2014), choice(T + 1.5, True)),
    })
    plan = followup.plan("What gloves do I wear for that?", ALARM_TURN, look)
    assert plan.carried and "scores higher" in plan.why


def test_a_follow_up_that_does_not_refer_back_takes_a_carried_row_only_on_its_merits() -> None:
    q = "Who won the football last night?"
    carried = f"{q} 2014 alarm coolant level low"
    look, _ = scripted({q: (found(SECTION), choice(T - 3.0, False)),
                        # the row, waved through by its identifier, below the check on its own measures
                        carried: (found(ROW_2014, by_identifier=True), choice(T - 0.3, True))})
    plan = followup.plan(q, ALARM_TURN, look)
    assert plan.query == q and not plan.covered and "refers to nothing before it" in plan.why
    look, _ = scripted({q: (found(SECTION), choice(T - 3.0, False)),
                        carried: (found(ROW_2014, by_identifier=True), choice(T + 0.5, True))})  # passes on its score
    assert followup.plan(q, ALARM_TURN, look).carried
    q = "Why does that happen?"  # refers back: the carried identifier's row is its answer
    look, _ = scripted({q: (found(SECTION), choice(T - 2.0, False)),
                        f"{q} 2014 alarm coolant level low": (found(ROW_2014, by_identifier=True),
                                                              choice(T - 1.0, True))})
    assert followup.plan(q, ALARM_TURN, look).carried


def test_what_refers_back() -> None:
    assert followup.refers_back("How do I clear it?") and followup.refers_back("Why does that happen?")
    assert followup.refers_back("And then?") and followup.refers_back("Why?")  # no word of its own
    assert not followup.refers_back("Who won the football last night?")
    assert not followup.refers_back("How much concentrate goes in?") and not followup.refers_back("And how often?")


def test_a_follow_up_that_finds_as_good_an_answer_alone_names_its_own_subject() -> None:
    q = "And the hydraulic oil?"
    look, _ = scripted({q: (found(SECTION), choice(T + 1.0, True)),
                        f"{q} 2014 alarm coolant level low": (found(ROW_2014), choice(T + 1.0, True))})
    plan = followup.plan(q, ALARM_TURN, look)
    assert plan.query == q and plan.carried == () and plan.why.startswith("names its own subject")


def test_a_follow_up_naming_an_identifier_is_retrieved_alone_known_or_not() -> None:
    for result in (found(ROW_2014, by_identifier=True), found(unknown_identifier=True)):
        look, asked = scripted({"And alarm 1010?": (result, None)})
        plan = followup.plan("And alarm 1010?", ALARM_TURN, look)
        assert asked == ["And alarm 1010?"] and plan.carried == () and "identifier 1010" in plan.why


def test_a_follow_up_the_documents_answer_neither_way_stays_alone() -> None:
    q = "What's the weather tomorrow?"
    look, _ = scripted({q: (found(SECTION), choice(T - 2.0, False)),
                        f"{q} 2014 alarm coolant level low": (found(ROW_2014), choice(T - 0.7, False))})
    plan = followup.plan(q, ALARM_TURN, look)
    assert plan.query == q and not plan.covered and plan.why.startswith("finds no answer")


def test_what_a_turn_was_about() -> None:
    idents, terms = followup.subject_of("What does alarm 2014 mean?", found(ROW_2014, known=["alarm", "2014"]),
                                        [ROW_2014])
    assert idents == ("2014",) and terms == ("alarm", "coolant", "level", "low")  # the row's name after its code
    idents, terms = followup.subject_of("How do I change the coolant?", found(SECTION, known=["chang", "coolant"]),
                                        [SECTION])
    assert idents == () and terms == ("change", "coolant")  # the heading's "Changing" is the same stem
    assert followup.title_of(SECTION) == "4.1 Changing the coolant"
    assert followup.subject_words(Turn("q", "a", (), ("KDF120",), ("filter", "filters", "return"))) == [
        "KDF120", "filter", "return"]


# --- the pipeline, with a fake engine ---------------------------------------------------------------------------


class CountingEngine(FakeEngine):
    """A fake engine with a context: a prompt is its messages' words; it records the messages of each call."""

    def __init__(self, n_ctx: int = 10_000) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.messages: list[list[Message]] = []

    def render(self, messages: Sequence[Message]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    def tokenize(self, prompt: str) -> list[int]:
        return [0] * len(prompt.split())

    def generate(self, messages: list[Message], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, deadline: float | None = None) -> Generation:
        self.messages.append(list(messages))
        return super().generate(messages, sampling, on_text, cancel, deadline)


def turns_of(messages: list[Message]) -> list[str]:
    """The conversation part of a prompt: what comes after the system prompt and the persona's examples."""
    return [m["content"] for m in messages[5:]]  # system, two examples of two messages each


def test_turns_are_numbered_echoed_and_reach_the_model_oldest_dropped_first() -> None:
    engine = CountingEngine()
    rt = fake_runtime(engine)
    memory = Conversations()
    replies = [handle(rt, Request(text=f"Question {n} about the coolant?", conversation="p1"), conversations=memory)
               for n in (1, 2, 3)]
    assert [(r.conversation, r.turn, r.status) for r in replies] == [("p1", 1, "ok"), ("p1", 2, "ok"), ("p1", 3, "ok")]
    assert turns_of(engine.messages[2]) == ["Question 1 about the coolant?", replies[0].text,
                                            "Question 2 about the coolant?", replies[1].text,
                                            "Question 3 about the coolant?"]
    # A context with room for one earlier turn only: the oldest goes first.
    prompt = len(engine.render(engine.messages[2]).split())
    small = CountingEngine(n_ctx=prompt + 160 - 10)  # 160: the persona's max_tokens
    again = handle(fake_runtime(small), Request(text="Question 3 about the coolant?", conversation="p1"),
                   conversations=_replay(memory, "p1", 2))
    assert turns_of(small.messages[0]) == ["Question 2 about the coolant?", replies[1].text,
                                           "Question 3 about the coolant?"]
    assert again.provenance["history_turns"] == 1


def _replay(memory: Conversations, name: str, keep: int) -> Conversations:
    """A store holding the first ``keep`` turns of ``name``."""
    conv = memory.get(name)
    assert conv is not None
    out = Conversations()
    for t in conv.turns[:keep]:
        out.begin(name)
        out.finish(name, t)
    return out


def test_the_same_turns_give_the_same_bytes_and_digest() -> None:
    results = []
    for _ in range(2):
        engine = CountingEngine()
        rt = fake_runtime(engine)
        memory = Conversations()
        for text in ("What does alarm 2014 mean?", "How do I clear it?"):
            reply = handle(rt, Request(text=text, conversation="c"), conversations=memory)
        results.append((engine.messages, reply.to_dict()))
    assert results[0] == results[1]
    first_turn = handle(fake_runtime(), Request(text="What does alarm 2014 mean?", conversation="x"),
                        conversations=Conversations())
    assert results[0][1]["provenance"]["conversation_sha256"] != first_turn.provenance["conversation_sha256"]


def test_a_request_alone_is_answered_as_it_always_was() -> None:
    rt = fake_runtime()
    alone = handle(rt, Request(text="What is a collet?", id="r1"))
    again = handle(rt, Request(text="What is a collet?", id="r1"), conversations=Conversations())
    assert alone.to_dict() == again.to_dict()
    assert "conversation" not in alone.to_dict() and "turn" not in alone.to_dict()
    assert not any(k.startswith("conversation") for k in alone.provenance)


def test_forget_ends_the_conversation_with_or_without_a_question() -> None:
    engine = CountingEngine()
    rt = fake_runtime(engine)
    memory = Conversations()
    handle(rt, Request(text="What does alarm 2014 mean?", conversation="c"), conversations=memory)
    gone = handle(rt, Request(text="", conversation="c", forget=True, id="f"), conversations=memory)
    assert (gone.status, gone.text, gone.turn, gone.conversation, gone.id) == ("ok", "", 0, "c", "f")
    fresh = handle(rt, Request(text="How do I clear it?", conversation="c"), conversations=memory)
    assert fresh.turn == 1 and turns_of(engine.messages[-1]) == ["How do I clear it?"]
    handle(rt, Request(text="Second?", conversation="c"), conversations=memory)
    restart = handle(rt, Request(text="Over again?", conversation="c", forget=True), conversations=memory)
    assert restart.turn == 1 and turns_of(engine.messages[-1]) == ["Over again?"]


@dataclass
class JudgingRelevance:
    """A relevance check, recording what it was asked: a text naming a word of another domain is refused whatever
    else it says; else one naming a word of the domain is allowed; a text naming neither says nothing of its topic,
    and is refused."""

    domain: tuple[str, ...] = ("alarm", "coolant", "spindle")
    other: tuple[str, ...] = ("poem", "weather", "joke")
    asked: list[tuple[str, bool]] = field(default_factory=list)
    checks_answers: bool = False

    def check(self, text: str, covered: bool = False) -> Verdict:
        self.asked.append((text, covered))
        if not any(w in text.lower() for w in self.other) and (covered or any(w in text.lower()
                                                                                for w in self.domain)):
            return ALLOW
        return Verdict(False, "relevance", "off_topic", "not of the domain")


def test_a_follow_up_is_judged_with_its_context_and_an_off_topic_turn_poisons_nothing() -> None:
    relevance = JudgingRelevance()
    base = fake_runtime(CountingEngine())
    rt = Runtime(config=base.config, engine=base.engine, model_file="fake.gguf",
                 relevance={"factory": cast(Relevance, relevance)})
    memory = Conversations()

    def ask(text: str) -> Any:
        return handle(rt, Request(text=text, conversation="c"), conversations=memory)

    assert ask("What does alarm 2014 mean?").status == "ok"
    follow = ask("Is it dangerous?")
    assert follow.status == "ok" and follow.turn == 2
    assert relevance.asked[-1] == ("What does alarm 2014 mean? Is it dangerous?", False)  # it refers back
    poem = ask("Write me a poem about autumn.")  # names its own subject: judged alone
    assert poem.status == "refused" and poem.error is not None and poem.error.code == "off_topic" and poem.turn == 3
    assert relevance.asked[-1] == ("Write me a poem about autumn.", False)
    about_it = ask("Write me a poem about it.")  # refers back: judged with the alarm question, refused all the same
    assert about_it.status == "refused"
    assert relevance.asked[-1][0] == "What does alarm 2014 mean? Write me a poem about it."
    later = ask("How long does it take?")  # judged with the alarm question, not with the refused ones
    assert later.status == "ok" and later.turn == 5
    assert relevance.asked[-1] == ("What does alarm 2014 mean? How long does it take?", False)
    # the refused turn is not among those the model sees
    conv = memory.get("c")
    assert conv is not None and [t.question for t in conv.turns] == [
        "What does alarm 2014 mean?", "Is it dangerous?", "How long does it take?"]


def test_the_scheduler_keeps_conversations_across_a_runtime_swap() -> None:
    scheduler = Scheduler(fake_runtime(FakeEngine("A")))
    scheduler.start()
    try:
        assert scheduler.ask(Request(text="First?", conversation="c"), timeout=5).turn == 1
        scheduler.swap(fake_runtime(FakeEngine("B"), fake_config(conversations={"max_turns": 1})))
        assert scheduler.ask(Request(text="Second?", conversation="c"), timeout=5).turn == 2
        assert scheduler.conversations.cfg.max_turns == 1
        assert scheduler.ask(Request(text="Alone?"), timeout=5).turn is None
    finally:
        scheduler.stop(grace_s=1)


def test_a_question_answered_only_with_a_carried_subject_is_judged_by_its_own_words() -> None:
    """The documents covered the carried subject (alarm 2014's row), not what the question asks: a question that
    names its own subject is judged alone, as if nothing covered it ("Who won the football last night?" was answered
    with an alarm row)."""
    relevance = JudgingRelevance()
    ctx = Context(turn=2, history=(ALARM_TURN,))
    carried = followup.Plan("q 2014 alarm", found(ROW_2014), choice(T + 1.0, True), carried=("2014", "alarm"))
    verdict, leaned = pipeline._relevant(cast(Relevance, relevance), "Who won the cup last night?", True, ctx, carried)
    assert not verdict.allowed and not leaned and relevance.asked[-1] == ("Who won the cup last night?", False)
    alone = followup.Plan("q", found(SECTION), choice(T + 1.0, True))  # covered by its own words
    verdict, _ = pipeline._relevant(cast(Relevance, relevance), "How do I drain the sump?", True, ctx, alone)
    assert verdict.allowed and relevance.asked[-1] == ("How do I drain the sump?", True)

"""Parallel slots with the real model: answers decoded together equal answers decoded alone, byte for byte; a slot
freed mid-batch is refilled from the queue; the provenance says which mode answered."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_assistant import app
from edge_assistant.config import Config, load_config
from edge_assistant.messages import Reply, Request
from edge_assistant.pipeline import Runtime, handle
from edge_assistant.scheduler import Scheduler
from edge_assistant.tomlconf import merge

from fakes import MODEL_ANSWERS

LONG = "Describe, step by step and in detail, the weekly maintenance of a CNC lathe and its coolant system."
MIX = [
    Request(text="Spindle 3 shows alarm 1012, coolant pressure low. What should I check first?", max_tokens=40),
    Request(text="How do I change a carbide insert?", max_tokens=24),
    Request(text="Guten Morgen, die Maschine steht.", persona="translator", max_tokens=16),
    Request(text="Name three coolant types.", temperature=0.3, max_tokens=30),
    Request(text="What is a collet?", max_tokens=12),
    Request(text=LONG, max_tokens=64),
    Request(text="How often should the way oil be topped up?", max_tokens=20),
    Request(text="Bitte den Not-Halt prüfen.", persona="translator", max_tokens=12),
    Request(text="What does a torque wrench setting of 25 Nm mean for the chuck jaws?", max_tokens=36),
    Request(text="The chip conveyor is jammed. What now?", max_tokens=28),
    Request(text="Name three kinds of cutting fluid.", temperature=0.7, max_tokens=20),
    Request(text="Why does climb milling leave a better finish on an aluminium pocket?", max_tokens=48),
]


@pytest.fixture(scope="module")
def slot_config(config: Config) -> Config:
    return load_config(None, merge(MODEL_ANSWERS, {"model": {"dir": config.model.dir}, "mqtt": {"enabled": False},
                                                   "profile": {"parallel": 4}}))


@pytest.fixture(scope="module")
def slot_runtime(slot_config: Config) -> Iterator[Runtime]:
    rt = app.load(slot_config, app.plan(slot_config))
    yield rt
    rt.close()


def _key(r: Reply) -> tuple[str, str, str]:
    return r.status, r.text, r.error.code if r.error else ""


def test_answers_decoded_together_equal_answers_decoded_alone(slot_runtime: Runtime, runtime: Runtime) -> None:
    assert slot_runtime.engine.parallel == 4  # type: ignore[attr-defined]
    alone = [handle(slot_runtime, r) for r in MIX]  # one at a time, through the slots
    assert all(a.status == "ok" and a.text and a.usage and a.usage.completion_tokens for a in alone), alone
    assert {a.provenance["parallel"] for a in alone} == {4}
    assert {a.provenance["determinism"] for a in alone} == {"invariant"}
    # The one-slot engine gives the same bytes: the same prompt pieces, cache layout and sampler chain.
    single = [handle(runtime, r) for r in MIX]
    assert [_key(s) for s in single] == [_key(a) for a in alone]

    sched = Scheduler(slot_runtime, queue_size=64)
    sched.start()
    try:
        for rnd in range(3):  # every request beside different others, in a different order each round
            order = MIX[rnd:] + MIX[:rnd] if rnd % 2 == 0 else list(reversed(MIX))
            replies = _ask_all(sched, order)
            assert [_key(x) for x in replies] == [_key(alone[MIX.index(r)]) for r in order], f"round {rnd}"
    finally:
        sched.stop()


def _ask_all(sched: Scheduler, requests: list[Request]) -> list[Reply]:
    """Submit every request at once; their replies, in the same order."""
    replies: dict[int, Reply] = {}
    done = threading.Event()

    def deliver_to(i: int):  # type: ignore[no-untyped-def]
        def deliver(reply: Reply) -> None:
            replies[i] = reply
            if len(replies) == len(requests):
                done.set()
        return deliver

    for i, req in enumerate(requests):
        sched.submit(req, deliver_to(i))
    assert done.wait(300)
    return [replies[i] for i in range(len(requests))]


def test_a_slot_freed_mid_batch_is_refilled_from_the_queue(slot_runtime: Runtime) -> None:
    shorts = [Request(text=q, max_tokens=6, id=f"s{i}") for i, q in enumerate(
        ["What is a collet?", "What is a chuck?", "What is a tailstock?", "What is a lathe?", "What is swarf?"])]
    alone = {r.id: handle(slot_runtime, r).text for r in shorts}
    events: list[str] = []
    lock = threading.Lock()

    def log(what: str) -> None:
        with lock:
            events.append(what)

    sched = Scheduler(slot_runtime, queue_size=16)
    sched.start()
    try:
        done = threading.Event()
        got: dict[str, Reply] = {}

        def reply_to(name: str):  # type: ignore[no-untyped-def]
            def deliver(reply: Reply) -> None:
                got[name] = reply
                log(f"reply {name}")
                if len(got) == 1 + len(shorts):
                    done.set()
            return deliver

        sched.submit(Request(text=LONG, max_tokens=200, id="long"), reply_to("long"),
                     on_text=lambda piece: log("long piece"))
        for r in shorts:  # 4 slots: the long answer and 3 short ones run, 2 wait for a slot to free
            sched.submit(r, reply_to(r.id))
        assert done.wait(300)
    finally:
        sched.stop()
    assert got["long"].status == "ok" and got["long"].usage is not None
    assert got["long"].usage.completion_tokens > 60
    last = events.index("reply s4")
    assert "long piece" in events[last:]  # the last short answer, started in a freed slot, ended mid-way
    assert {r.id: got[r.id].text for r in shorts} == alone


def test_a_quantization_not_shown_invariant_keeps_one_slot(quantized: dict[str, Path]) -> None:
    path = quantized["Q4_K_M"]
    strict = load_config(None, {"model": {"dir": str(path.parent), "file": path.name}, "mqtt": {"enabled": False},
                                "profile": {"parallel": 4}})
    assert app.plan(strict).choice.parallel == 1
    loose = load_config(None, merge(MODEL_ANSWERS, {"model": {"dir": str(path.parent), "file": path.name},
                                                    "mqtt": {"enabled": False},
                                                    "profile": {"parallel": 4, "determinism": "per-request"}}))
    rt = app.load(loose, app.plan(loose))
    try:
        reply = handle(rt, MIX[1])
        assert reply.status == "ok" and reply.provenance["parallel"] == 4
        assert reply.provenance["determinism"] == "per-request"
    finally:
        rt.close()



def test_the_guard_s_embeddings_compute_on_the_decode_thread(slot_runtime: Runtime) -> None:
    # llama.cpp's OpenMP threads form one team per calling thread: embeddings computed on the request workers
    # slowed every later step of the decode thread, so they are handed to it.
    engine = slot_runtime.engine
    assert engine.run(lambda: threading.current_thread().name) == "decode"  # type: ignore[attr-defined]
    with pytest.raises(ZeroDivisionError):
        engine.run(lambda: 1 // 0)  # type: ignore[attr-defined]
    assert slot_runtime.embedder is not None
    seen: list[str] = []
    original = slot_runtime.embedder._compute

    def spy(text: str) -> object:
        seen.append(threading.current_thread().name)
        return original(text)

    slot_runtime.embedder._compute = spy
    try:
        slot_runtime.embedder.embed(["a sentence about coolant pumps, never embedded before"])
    finally:
        del slot_runtime.embedder._compute
    assert seen == ["decode"]


def test_with_one_slot_a_start_up_embedding_computes_on_a_thread_that_ends(runtime: Runtime) -> None:
    engine = runtime.engine
    assert threading.current_thread() is threading.main_thread()
    assert engine.run(lambda: threading.current_thread().name) == "compute"  # type: ignore[attr-defined]
    names: list[str] = []
    worker = threading.Thread(target=lambda: names.append(engine.run(  # type: ignore[attr-defined]
        lambda: threading.current_thread().name)), name="inference")
    worker.start()
    worker.join()
    assert names == ["inference"]  # the generating thread computes its own embeddings
    assert not [t for t in threading.enumerate() if t.name == "compute"]


def test_a_lora_adapter_with_slots_is_a_clear_error(slot_runtime: Runtime) -> None:
    from edge_assistant.errors import ConfigError

    with pytest.raises(ConfigError, match=r"personas\.factory\.adapter: .*needs parallel = 1 .*4 slots"):
        slot_runtime.engine.load_adapters({"personas.factory.adapter": "adapter.gguf"})  # type: ignore[attr-defined]


def test_slots_that_cannot_be_allocated_are_a_clear_error(slot_config: Config) -> None:
    from dataclasses import replace

    import psutil

    from edge_assistant.engine import Engine
    from edge_assistant.errors import ModelTooLargeError

    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("the kernel grants any allocation here (overcommit_memory = 1): it would fail later, killed")
    plan = app.plan(slot_config)
    # 256 slots whose KV caches need four times this machine's memory: refused when llama.cpp allocates them.
    per_slot = 4 * psutil.virtual_memory().total // (256 * plan.choice.info.kv_bytes(1))
    n_ctx = (per_slot // 256 + 1) * 256
    with pytest.raises(ModelTooLargeError, match=f"could not make a context of 256 slots of {n_ctx} tokens"):
        Engine.load(replace(plan.choice, parallel=256, n_ctx=n_ctx), plan.settings, "0" * 64)

"""The engine and pipeline with the real model: determinism, streaming, cancel, bounds, provenance."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from edge_assistant import app
from edge_assistant.config import Config, load_config
from edge_assistant.cpuload import ThreadGovernor
from edge_assistant.engine import Engine, LlamaEmbedder
from edge_assistant.messages import Request, Sampling
from edge_assistant.pipeline import handle
from edge_assistant.scheduler import Scheduler
from edge_assistant.tomlconf import merge

from conftest import ROOT
from fakes import MODEL_ANSWERS

Q = "Spindle 3 shows alarm 1012, coolant pressure low. What should I check first?"
LONG = "Describe, step by step and in detail, the weekly maintenance of a CNC lathe and its coolant system."


def test_same_request_same_bytes_whatever_was_asked_before(scheduler: Scheduler) -> None:
    first = scheduler.ask(Request(text=Q, max_tokens=48))
    assert first.status == "ok" and first.text
    answers = [first.text]
    # Unrelated requests, a request sharing the persona prefix, a different persona, a sampled request.
    for earlier in (Request(text="How do I change a carbide insert?", max_tokens=30),
                    Request(text=Q + " Also the chip conveyor is jammed.", max_tokens=20),
                    Request(text="Guten Morgen", persona="translator", max_tokens=10),
                    Request(text="Name three coolant types.", temperature=0.3, max_tokens=25)):
        scheduler.ask(earlier)
        again = scheduler.ask(Request(text=Q, max_tokens=48))
        answers.append(again.text)
    assert len(set(answers)) == 1, answers
    assert first.provenance["seed"] == 1234


def test_prefix_cache_cold_and_warm_give_the_same_bytes(scheduler: Scheduler) -> None:
    scheduler.ask(Request(text="Guten Morgen", persona="translator", max_tokens=5))  # evicts the factory prefix
    cold = scheduler.ask(Request(text=Q, max_tokens=40))
    warm = scheduler.ask(Request(text=Q, max_tokens=40))
    other = scheduler.ask(Request(text="How do I clean the chip tray?", max_tokens=40))
    assert cold.usage is not None and warm.usage is not None and other.usage is not None
    assert (cold.usage.prefix_cached, warm.usage.prefix_cached, other.usage.prefix_cached) == (False, True, True)
    assert cold.text == warm.text
    scheduler.ask(Request(text="Guten Morgen", persona="translator", max_tokens=5))
    other_cold = scheduler.ask(Request(text="How do I clean the chip tray?", max_tokens=40))
    assert other_cold.usage is not None and not other_cold.usage.prefix_cached
    assert other_cold.text == other.text


def test_sampled_request_repeats_with_fixed_seed(scheduler: Scheduler) -> None:
    req = Request(text="Name three coolant types.", temperature=0.3, max_tokens=30)
    a = scheduler.ask(req)
    scheduler.ask(Request(text="What is a collet?", max_tokens=10))
    b = scheduler.ask(req)
    assert a.text == b.text
    assert a.provenance["sampling"]["temperature"] == 0.3


def test_same_bytes_across_processes(scheduler: Scheduler, config: Config, tmp_path: Path) -> None:
    here = scheduler.ask(Request(text=Q, max_tokens=48))
    model_answers = tmp_path / "config.toml"
    model_answers.write_text('[personas.factory.knowledge]\nfallback = "model"\n')
    env = {**os.environ, "EDGE_ASSISTANT_MODEL_DIR": str(config.model.directory()),
           "EDGE_ASSISTANT_CONFIG": str(model_answers)}
    outs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "edge_assistant.cli", "generate", "--json", "--max-tokens",
                               "48", Q], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    assert outs[0]["text"] == outs[1]["text"] == here.text
    assert outs[0]["provenance"] == outs[1]["provenance"]


def test_provenance_names_everything(scheduler: Scheduler) -> None:
    reply = scheduler.ask(Request(text="What is a collet?", max_tokens=8))
    p = reply.provenance
    assert p["model_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert p["quantization"] == "Q4_1" and p["backend"] == "cpu" and p["seed"] == 1234
    assert p["sampling"]["temperature"] == 0.0 and p["sampling"]["max_tokens"] == 8
    assert len(p["config_sha256"]) == 64 and p["profile"]
    assert reply.usage is not None and reply.usage.completion_tokens <= 8


def test_temperature_and_length_are_clamped(scheduler: Scheduler) -> None:
    reply = scheduler.ask(Request(text="What is a collet?", temperature=5.0, max_tokens=100000))
    assert reply.provenance["sampling"]["temperature"] == 0.3
    assert reply.provenance["sampling"]["max_tokens"] == 512


def test_streaming_pieces_make_the_answer(scheduler: Scheduler) -> None:
    # The factory persona checks its answers sentence by sentence: it streams whole sentences.
    pieces: list[str] = []
    reply = scheduler.ask(Request(text=Q, max_tokens=40), on_text=pieces.append)
    assert len(pieces) >= 2 and all(p.rstrip()[-1] in ".!?" for p in pieces[:-1])
    assert "".join(pieces).strip() == reply.text
    # A persona without that check streams token by token.
    pieces = []
    reply = scheduler.ask(Request(text="Das Kühlmittel ist fast leer.", persona="translator", max_tokens=40),
                          on_text=pieces.append)
    assert len(pieces) > 5
    assert "".join(pieces).strip() == reply.text


def test_cancel_between_tokens(scheduler: Scheduler) -> None:
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            scheduler.cancel("cancel-me")

    # The translator streams token by token: the cancel lands between two tokens.
    reply = scheduler.ask(Request(text=Q, persona="translator", max_tokens=100), on_text=on_text, key="cancel-me")
    assert reply.status == "error" and reply.error is not None and reply.error.code == "cancelled"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    # The factory persona streams sentences: a cancel after the first ends the answer before the next one.
    pieces.clear()

    def after_first(piece: str) -> None:
        pieces.append(piece)
        scheduler.cancel("cancel-factory")

    reply = scheduler.ask(Request(text=LONG, max_tokens=200), on_text=after_first, key="cancel-factory")
    assert reply.status == "error" and reply.error is not None and reply.error.code == "cancelled"
    assert len(pieces) == 1 and reply.usage is not None and reply.usage.completion_tokens < 200


def test_request_faults_are_replies(scheduler: Scheduler) -> None:
    r = scheduler.ask(Request(text="hi", persona="astrologer"))
    assert r.status == "error" and r.error is not None and r.error.code == "unknown_persona"
    r = scheduler.ask(Request(text="x" * 5000))
    assert r.error is not None and r.error.code == "bad_request" and "at most 1000" in r.error.message
    r = scheduler.ask(Request(text="   "))
    assert r.error is not None and r.error.code == "bad_request"


def test_context_overflow_is_refused_before_generating(model_path) -> None:  # type: ignore[no-untyped-def]
    config = load_config(None, merge(MODEL_ANSWERS, {"model": {"dir": str(model_path.parent)},
                                                     "profile": {"n_ctx": 256},
                                                     "personas": {"factory": {"max_input_chars": 100000,
                                                                              "guard": {"strictness": "off"}}}}))
    plan = app.plan(config)
    assert plan.choice.n_ctx == 256
    runtime = app.load(config, plan)
    assert isinstance(runtime.engine, Engine)
    reply = handle(runtime, Request(text="coolant " * 400))
    assert reply.status == "error" and reply.error is not None
    assert reply.error.code == "context_overflow"
    assert "context holds 256" in reply.error.message
    ok = handle(runtime, Request(text="What is a collet?", max_tokens=400))
    assert ok.status == "ok" and ok.usage is not None
    assert ok.usage.prompt_tokens + ok.usage.completion_tokens <= 256
    runtime.close()


GIVE_S = 1.0
"""How long the first computation of each kind waits inside for one of the other kind to begin beside it: the
chance an overlap gets to show (a wait, never a bound asserted)."""


class Trace:
    """Records when each computation on the model begins and ends, and on which thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.entered = {"generate": threading.Event(), "embed": threading.Event()}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def computing(self, kind: str) -> Iterator[None]:
        with self._lock:
            first = not self.entered[kind].is_set()
            self.events.append((kind, "in", threading.current_thread().name))
        self.entered[kind].set()
        if first:
            self.entered["embed" if kind == "generate" else "generate"].wait(GIVE_S)
        try:
            yield
        finally:
            with self._lock:
                self.events.append((kind, "out", threading.current_thread().name))

    def overlaps(self) -> list[tuple[str, str, str]]:
        """Events at which a computation began while one of the other kind was running."""
        running = {"generate": 0, "embed": 0}
        out = []
        for kind, edge, thread in self.events:
            if edge == "in":
                if running["embed" if kind == "generate" else "generate"]:
                    out.append((kind, edge, thread))
                running[kind] += 1
            else:
                running[kind] -= 1
        return out


class FakeLlama:
    """Just enough of ``llama_cpp.Llama`` for ``Engine`` (generation) and ``LlamaEmbedder`` (embeddings); each
    computation is recorded in ``trace``."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.metadata = {"general.architecture": "bert", "bert.pooling_type": "1"}
        self.n_tokens = 0
        self.input_ids: list[int] = []

    def n_ctx(self) -> int:
        return 512

    def n_embd(self) -> int:
        return 4

    def token_eos(self) -> int:
        return -1

    def token_bos(self) -> int:
        return -1

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return [ord("a")] * max(1, len(text.split()))

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return b" w" * len(tokens)

    def set_seed(self, seed: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def generate(self, prompt: list[int], **_kwargs: Any) -> Iterator[int]:
        with self.trace.computing("generate"):
            yield from (101, 102, 103)

    def embed(self, text: str, normalize: bool = False, truncate: bool = True) -> list[float]:
        with self.trace.computing("embed"):
            return [1.0, float(len(text)), 0.0, 0.5]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("first", ["reload", "generation"])
def test_a_reload_never_computes_beside_a_generation(monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """One slot: a SIGHUP reload embeds the guard's examples on the reload thread while the request worker
    generates. Whichever begins first, no embedding runs while a generation does, on the same model and governor."""
    from edge_assistant import engine as engine_module

    monkeypatch.setattr(engine_module, "_eog_check", lambda llm: lambda token: False)
    trace = Trace()
    settings = SimpleNamespace(n_gpu_layers=0, profile="test")
    info = SimpleNamespace(path=Path("fake.gguf"), quantization="Q4_1", size=1)
    choice = SimpleNamespace(parallel=1, invariant=True, n_ctx=512, info=info)
    governor = ThreadGovernor(2, 2, 0)
    engine = Engine(FakeLlama(trace), cast(Any, choice), cast(Any, settings), "0" * 64, governor)
    embedder = LlamaEmbedder(FakeLlama(trace), None, governor, engine.run)
    config = load_config(None, merge(MODEL_ANSWERS, {"mqtt": {"enabled": False}}))
    plan = cast(Any, SimpleNamespace(choice=choice, settings=settings))
    done: dict[str, Any] = {}

    def generate() -> None:
        sampling = Sampling(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, max_tokens=8,
                            seed=1)
        done["generation"] = engine.generate([{"role": "user", "content": "What is a collet?"}], sampling)

    def reload() -> None:
        done["reload"] = app.build_runtime(config, plan, engine, embedder, None)

    threads = {"generation": threading.Thread(target=generate, name="request-worker"),
               "reload": threading.Thread(target=reload, name="reload")}
    second = "reload" if first == "generation" else "generation"
    threads[first].start()
    assert trace.entered["generate" if first == "generation" else "embed"].wait(30)
    threads[second].start()
    for t in threads.values():
        t.join(60)
    assert not any(t.is_alive() for t in threads.values())
    assert done["generation"].text == " w w w" and done["generation"].completion_tokens == 3
    examples = config.personas["factory"].guard
    # the reload embedded the guard's examples (and the classifier's corpus with them), all on its own thread
    assert sum(1 for kind, edge, _ in trace.events if kind == "embed" and edge == "in") >= (
        len(examples.on_topic) + len(examples.off_topic))
    assert {thread for kind, _, thread in trace.events if kind == "embed"} == {"reload"}
    assert trace.overlaps() == []

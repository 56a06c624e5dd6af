"""Command line: ``edge-assistant detect | models | generate | prepare | run | ask | chat | listen | knowledge``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import app, followup, logsafe
from .config import Config, config_path_from_env, load_config
from .conversations import Turn, read_conversation
from .errors import EdgeError
from .hardware import HardwareInfo
from .knowledge import Choice, Found, Retriever, build_index, choose
from .knowledge.answer import THRESHOLD
from .messages import Reply, Request
from .models import MIB
from .profiles import Settings
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if args.config else config_path_from_env()
    extra: dict[str, Any] = {}
    if getattr(args, "model_dir", None):
        extra["model"] = {"dir": args.model_dir}
    if getattr(args, "profile", None):
        extra["profile"] = {"name": args.profile}
    return load_config(path, extra)


def _gib(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / 1024 / MIB:.1f} GiB"


def cmd_detect(args: argparse.Namespace) -> int:
    config = _config(args)
    hw, settings = app.plan_settings(config, Path(args.root), voice=args.voice)
    if args.json:
        print(json.dumps(detect_json(hw, settings), indent=2))
        return 0
    print("Hardware")
    print(f"  board:        {hw.board or 'unknown'}" + (f"   soc: {hw.soc}" if hw.soc else ""))
    print(f"  arch:         {hw.arch}   cpu: {hw.cpu_model or (hw.cpus[0].part if hw.cpus else '?')}")
    print(f"  features:     {' '.join(sorted(hw.features)) or 'none of note'}")
    big = f", {hw.core_names[0]} cores {list(hw.big_cpus)}" if hw.heterogeneous else ""
    print(f"  cpus:         {len(hw.cpus)} logical, {hw.physical_cores} physical{big}")
    print(f"  affinity:     {list(hw.affinity)}   cgroup quota: "
          f"{'none' if hw.cpu_quota is None else f'{hw.cpu_quota:g} CPUs'}   usable: {hw.usable_cpus}")
    print(f"  memory:       {_gib(hw.mem_total)} total, {_gib(hw.mem_available)} available, "
          f"cgroup limit {_gib(hw.mem_cgroup_limit)}")
    print(f"  cuda:         {'yes' if hw.cuda else 'no'} ({hw.cuda_reason})")
    if hw.jetson:
        print(f"  jetson:       {hw.jetson}")
    for t in hw.thermal:
        print(f"  thermal:      {t.zone} {t.celsius:.1f} C")
    print(f"\nProfile: {settings.profile}")
    for key in ("n_threads", "n_threads_batch", "n_ctx", "n_batch", "n_ubatch", "n_gpu_layers", "use_mmap",
                "use_mlock", "memory_share", "quant_order", "parallel", "determinism"):
        print(f"  {key:<16} {settings.reasons[key]}")
    print(f"  why:             {settings.reasons['profile']}")
    try:  # the model choice under this machine's memory budget, where a model directory is there to choose from
        choice = app.plan(config, Path(args.root), voice=args.voice).choice
    except EdgeError as exc:
        print(f"\nModel: none chosen ({exc.message})")
        return 0
    slots = f", {choice.parallel} slots" if choice.parallel > 1 else ""
    print(f"\nModel: {choice.info.path.name}, n_ctx {choice.n_ctx}{slots}")
    for reason in choice.reasons[1:]:
        print(f"  {reason}")
    return 0


DETECT_SCHEMA = 1
"""The version of ``detect --json``'s layout; it changes only when a field is removed or changes meaning."""


def detect_json(hw: HardwareInfo, settings: Settings) -> dict[str, Any]:
    """``detect --json``: a stable layout of plain JSON types (documented in the README)."""
    return {
        "schema": DETECT_SCHEMA,
        "hardware": {
            "arch": hw.arch, "board": hw.board, "soc": hw.soc, "compatible": list(hw.compatible),
            "cpu_model": hw.cpu_model, "features": sorted(hw.features),
            "cpus": [{"index": c.index, "package": c.core[0], "core": c.core[1], "kind": c.kind,
                      "capacity": c.capacity, "max_khz": c.max_khz, "part": c.part, "core_name": c.core_name}
                     for c in hw.cpus],
            "big_cpus": list(hw.big_cpus), "heterogeneous": hw.heterogeneous, "affinity": list(hw.affinity),
            "cpu_quota": hw.cpu_quota, "usable_cpus": hw.usable_cpus, "mem_total": hw.mem_total,
            "mem_available": hw.mem_available, "mem_cgroup_limit": hw.mem_cgroup_limit, "jetson": hw.jetson,
            "cuda": hw.cuda, "cuda_reason": hw.cuda_reason,
            "thermal": [{"zone": t.zone, "celsius": t.celsius} for t in hw.thermal],
        },
        "settings": {
            "profile": settings.profile, "quant_order": list(settings.quant_order),
            "n_threads": settings.n_threads, "n_threads_batch": settings.n_threads_batch, "n_ctx": settings.n_ctx,
            "n_batch": settings.n_batch, "n_ubatch": settings.n_ubatch, "n_gpu_layers": settings.n_gpu_layers,
            "use_mmap": settings.use_mmap, "use_mlock": settings.use_mlock, "memory_share": settings.memory_share,
            "parallel": settings.parallel, "determinism": settings.determinism, "reasons": dict(settings.reasons),
        },
    }


def cmd_models(args: argparse.Namespace) -> int:
    config = _config(args)
    from .models import scan

    directory = config.model.directory()
    infos, bad = scan(directory)
    if args.json:
        rc = 0
        try:
            plan = app.plan(config)
            chosen: dict[str, Any] = {"file": plan.choice.info.path.name, "n_ctx": plan.choice.n_ctx,
                                      "parallel": plan.choice.parallel, "invariant": plan.choice.invariant,
                                      "reasons": plan.choice.reasons, "rejected": plan.choice.rejected}
        except EdgeError as exc:
            chosen = {"error": {"code": exc.code, "message": exc.message}}
            rc = exc.exit_code
        print(json.dumps({"dir": str(directory), "models": [asdict(i) for i in infos], "unreadable": bad,
                          "choice": chosen}, indent=2, default=str))
        return rc
    print(f"Models in {directory}")
    for i in infos:
        print(f"  {i.path.name:<44} {i.quantization:<8} {i.size / MIB:7.1f} MiB  {i.architecture} "
              f"{i.parameters / 1e6:.0f}M params, trained ctx {i.context_length}, "
              f"{'chat template' if i.chat_template else 'no chat template'}")
    for line in bad:
        print(f"  unreadable: {line}")
    plan = app.plan(config)
    slots = f", {plan.choice.parallel} slots" if plan.choice.parallel > 1 else ""
    print(f"\nChoice (profile {plan.settings.profile}): {plan.choice.info.path.name}, n_ctx {plan.choice.n_ctx}{slots}")
    for r in plan.choice.reasons:
        print(f"  - {r}")
    for r in plan.choice.rejected:
        print(f"  passed over: {r}")
    return 0


def _serve_locally(config: Config, voice: bool = False) -> Scheduler:
    """The model loaded and a scheduler running, in this process (no broker)."""
    plan = app.plan(config, voice=voice)
    scheduler = Scheduler(app.load(config, plan), config.limits.queue_size)
    scheduler.start()
    return scheduler


class _Printer:
    """Prints streamed pieces as they come; ``shown`` says whether any came (a refusal is not streamed)."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, piece: str) -> None:
        self.shown = True
        sys.stdout.write(piece)
        sys.stdout.flush()


def print_sources(reply: dict[str, Any] | Reply, out: Any = sys.stdout) -> None:
    """The sources of an answer, one per line under it; or, for an answer no document supports, that it is not
    from the plant's documents."""
    sources = reply.get("sources") if isinstance(reply, dict) else [asdict(s) for s in reply.sources]
    grounded = reply.get("grounded") if isinstance(reply, dict) else reply.grounded
    if grounded is False:
        print("\n(Not from the plant's documents: the model answered alone. Check it before you act on it.)",
              file=out)
    if not sources:
        return
    print("\nSources:", file=out)
    for i, src in enumerate(sources, 1):
        print(f"  [{i}] {src['document']}, {src['location']}: {src['excerpt']}", file=out)


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config(args)
    scheduler = _serve_locally(config)
    streamed = not args.json
    show = _Printer()

    try:
        reply = scheduler.ask(Request(text=args.text, persona=args.persona or "", max_tokens=args.max_tokens,
                                      temperature=args.temperature), on_text=show if streamed else None)
    finally:
        scheduler.stop(grace_s=0)
    if args.json:
        print(json.dumps(reply.to_dict(), ensure_ascii=False, indent=2))
    else:
        if not show.shown:
            sys.stdout.write(reply.text)  # a refusal is not streamed
        sys.stdout.write("\n")
        print_sources(reply)
        if reply.error is not None:
            print(f"edge-assistant: {reply.error.code}: {reply.error.message}", file=sys.stderr)
    return 0 if reply.status == "ok" else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    """Everything start-up would compute that depends only on the model and the config: the guard examples'
    embeddings (cached beside the embedding model) and the documents' index, so that the daemon starts in seconds."""
    config = _config(args)
    t0 = time.monotonic()
    plan = app.plan(config)
    runtime = app.load(config, plan)
    cache = runtime.embedder.cache_path if runtime.embedder is not None else None
    runtime.close()
    print(f"prepared {plan.choice.info.path.name} in {time.monotonic() - t0:.1f} s"
          + (f"; guard examples embedded in {cache}" if cache is not None and cache.is_file() else "")
          + ("; documents indexed" if config.knowledge.paths else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .service import run, setup_logging

    setup_logging(args.log_level or "INFO")
    path = Path(args.config) if args.config else config_path_from_env()
    config = _config(args)
    return run(config, path)


class _Asker:
    """Requests to a running daemon over MQTT, as ``ask`` and ``chat`` send them: to the device's request topic
    (and persona), each with a reply topic of its own under the allowed prefix."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .mqtt import _password
        from .protocol import Topics

        config = _config(args)
        m = config.mqtt
        self.mqtt = m
        self.topics = Topics(m.prefix, args.device or config.device)
        self.topic = self.topics.request + (f"/{args.persona}" if args.persona else "")
        self.host, self.port = args.host or m.host, args.port or m.port
        self.timeout = args.timeout
        self.password = _password(m.password_file, m.password_env) if m.username else None

    def __call__(self, body: dict[str, Any], on_chunk: Any = None) -> dict[str, Any]:
        import uuid

        from .askclient import ask

        reply_topic = f"{self.mqtt.response_prefix or self.mqtt.prefix + '/'}{self.topics.device}/reply/" \
                      f"{uuid.uuid4().hex[:12]}"
        body = {**body, "id": uuid.uuid4().hex[:12]}
        return ask(self.host, self.port, self.topic, reply_topic, body, on_chunk=on_chunk, timeout_s=self.timeout,
                   username=self.mqtt.username, password=self.password)


def _show(reply: dict[str, Any], show: _Printer) -> None:
    """A reply as ``ask`` prints it: the answer (streamed already, unless refused), its sources, an error line."""
    if not show.shown:
        sys.stdout.write(str(reply.get("text", "")))  # a refusal is not streamed
    sys.stdout.write("\n")
    print_sources(reply)
    if reply.get("status") != "ok":
        err = reply.get("error") or {}
        print(f"edge-assistant: {err.get('code', reply.get('status'))}: {err.get('message', '')}", file=sys.stderr)
    sys.stdout.flush()


def cmd_ask(args: argparse.Namespace) -> int:
    asker = _Asker(args)
    body: dict[str, Any] = {"text": args.text, "stream": not args.json}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.conversation:
        body["conversation"] = args.conversation
        if args.forget:
            body["forget"] = True
    elif args.forget:
        print("edge-assistant: --forget needs --conversation", file=sys.stderr)
        return 64
    show = _Printer()
    reply = asker(body, None if args.json else show)
    if args.json:
        print(json.dumps(reply, ensure_ascii=False, indent=2))
    else:
        _show(reply, show)
    return 0 if reply.get("status") == "ok" else 1


CHAT_HELP = """Type a question and press Enter; the answer streams, its sources under it.
  /forget   start the conversation over (the next question names its own subject)
  /bye      leave (also Ctrl-D)
  /?        this help"""


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation with a running daemon, in the spirit of ``ollama run``: a prompt, the answer as
    it streams with its sources under it, every question a turn of one conversation."""
    import uuid

    from .errors import AskError

    asker = _Asker(args)
    conversation = args.conversation or f"chat-{uuid.uuid4().hex[:12]}"
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Conversation {conversation} with {asker.topics.device}. /? for help, /bye to leave.", flush=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text in ("/?", "/help"):
            print(CHAT_HELP, flush=True)
            continue
        body: dict[str, Any] = {"conversation": conversation, "stream": True}
        if text == "/forget":
            body["forget"] = True
        elif text.startswith("/"):
            print(f"Unknown command {text.split()[0]!r}. /? for help.", flush=True)
            continue
        else:
            body["text"] = text
            if args.max_tokens is not None:
                body["max_tokens"] = args.max_tokens
        show = _Printer()
        try:
            reply = asker(body, show)
        except AskError as exc:
            print(f"edge-assistant: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
            continue
        if body.get("forget") and reply.get("status") == "ok":
            print("(Forgotten: the next question starts a new conversation.)", flush=True)
            continue
        _show(reply, show)


def cmd_listen(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .voice import VoiceLoop, WavSink, WavSource

    config = _config(args)
    voice = replace(config.voice, enabled=True, activation=args.activation, wake_phrase=args.wake or "",
                    persona=args.persona or config.voice.persona, input="wav", input_path=args.wav,
                    output="wav", output_path=args.out)
    scheduler = _serve_locally(config, voice=True)
    events: list[dict[str, Any]] = []

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind != "partial":
            events.append({"event": kind, **data})
            if not args.json:
                print(f"{kind}: {data}", flush=True)

    loop = VoiceLoop.load(voice, config, scheduler, WavSource(Path(args.wav), realtime=args.realtime),
                          WavSink(Path(args.out), realtime=args.realtime), on_event)
    t0 = time.monotonic()
    try:
        loop.run()
    finally:
        scheduler.stop(grace_s=0)
    wall = time.monotonic() - t0
    if args.json:
        print(json.dumps({"events": events, "timings": list(loop.timings), "wall_s": wall,
                          "synthesis_s": loop.speaker.synth_s, "audio_out_s": loop.speaker.audio_s},
                         ensure_ascii=False, indent=2))
    return 0 if loop.replies and all(r.status == "ok" for r in loop.replies) else 1


def cmd_persona(args: argparse.Namespace) -> int:
    """``persona import``: an Ollama Modelfile as a persona TOML, checked by loading it with the config."""
    from . import modelfile

    config = _config(args)
    try:
        text = Path(args.modelfile).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"edge-assistant: {args.modelfile}: {exc.strerror or exc}", file=sys.stderr)
        return 66
    directory = config.model.directory()
    files = {p.name for p in directory.glob("*.gguf")} if directory.is_dir() else set()
    imported = modelfile.parse(text, files, str(Path(args.modelfile).resolve().parent))
    toml_text = modelfile.to_toml(args.name, imported.persona)
    try:
        load_config(None, {"personas": {args.name: imported.persona}})
    except EdgeError as exc:
        print(f"edge-assistant: the persona would not load: {exc.message}", file=sys.stderr)
        return 78
    for note in imported.notes:
        print(f"{args.modelfile}: {note}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(toml_text, encoding="utf-8")
        print(f"persona {args.name!r} written to {args.out}: append it to the config", file=sys.stderr)
    else:
        print(toml_text, end="")
    return 0


def cmd_knowledge(args: argparse.Namespace) -> int:
    config = _config(args)
    kcfg = config.knowledge
    if not kcfg.paths:
        print("edge-assistant: no documents configured: set [knowledge] paths in the config", file=sys.stderr)
        return 78
    embedder = app.knowledge_embedder(config)
    try:
        if args.action == "index":
            report = build_index(kcfg, embedder)
            if args.json:
                print(json.dumps(asdict(report), indent=2))
                return 0
            print(f"Index {kcfg.index_path()}: {report.chunks} passages, digest {report.digest[:16]}")
            print(f"  added {len(report.added)}, updated {len(report.updated)}, removed {len(report.removed)}, "
                  f"unchanged {report.unchanged}; {report.pages} pages read, {report.embedded} units embedded in "
                  f"{report.seconds:.2f} s")
            for line in report.skipped:
                print(f"  skipped: {line}")
            return 0
        retriever = Retriever.open(kcfg, embedder)
        try:
            return _knowledge_read(args, retriever, config)
        finally:
            retriever.close()
    finally:
        if embedder is not None:
            embedder.close()


def _last_turn(config: Config, name: str) -> tuple[Turn | None, str]:
    """The last answered turn of conversation ``name`` as the daemon keeps it (read from its file, nothing
    written), and a line saying what it was about."""
    directory = config.conversations.directory()
    conv = read_conversation(directory, name)
    if conv is None:
        return None, f"no conversation of that name in {directory}: the question is a first turn"
    if conv.used <= time.time() - config.conversations.idle_s:
        return None, f"expired (idle past {config.conversations.idle_s:g} s): the question is a first turn"
    if not conv.turns:
        return None, f"{conv.asked} turn(s) asked, none answered: the question is a first turn"
    last = conv.turns[-1]
    about = " ".join(followup.subject_words(last)) or "nothing the documents name"
    return last, f"{conv.asked} turn(s) so far; the last answered one asked {last.question!r}, about: {about}"


def _knowledge_read(args: argparse.Namespace, retriever: Retriever, config: Config) -> int:
    """``knowledge list`` and ``knowledge search``: what is indexed, and what a question finds and why."""
    if args.action == "list":
        docs = retriever.documents()
        if args.json:
            print(json.dumps([asdict(d) for d in docs], indent=2))
            return 0
        print(f"Index {retriever.path} (digest {retriever.digest[:16]}):")
        for d in docs:
            print(f"  {d.name:<40} {d.kind:<8} {d.pages:4d} pages {d.chunks:5d} passages  {d.sha256[:12]}")
        return 0
    text = " ".join(args.text)
    t0 = time.monotonic()
    plan: followup.Plan | None = None
    said = ""
    if args.conversation:

        def look(query: str) -> tuple[Found, Choice | None]:
            f = retriever.find(query, limit=args.limit)
            return f, choose(f, retriever.dense, retriever.min_coverage)

        previous, said = _last_turn(config, args.conversation)
        plan = followup.plan(text, previous, look)
        found, choice = plan.found, plan.choice
    else:
        found = retriever.find(text, limit=args.limit)
        choice = choose(found, retriever.dense, retriever.min_coverage)
    ms = (time.monotonic() - t0) * 1000
    answered = choice is not None and choice.supported
    if args.json:
        out: dict[str, Any] = {"query": text, "ms": round(ms, 2), "covered": answered,
                               "choice": asdict(choice) if choice is not None else None,
                               "passages": [asdict(p) for p in found.passages]}
        if plan is not None:
            out["follow_up"] = {"conversation": args.conversation, "last_turn": said, "carried": list(plan.carried),
                                "query": plan.query, "why": plan.why, "alone_score": plan.alone_score,
                                "carried_score": plan.carried_score}
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    if plan is not None:
        print(f"Conversation {args.conversation!r}: {said}")
        print(f"  carried over: {' '.join(plan.carried) if plan.carried else 'nothing'}")
        print(f"  why: {plan.why}")
        print(f"  retrieved with: {plan.query}\n")
    how = "by meaning and words" if retriever.dense else "by words only (no sentence vectors)"
    print(f"{len(found.passages)} passage(s) in {ms:.1f} ms, {how}")
    if choice is None:
        print("NOT covered: no passage holds any of the question's words")
    else:
        verdict = "answers" if answered else "does NOT answer"
        print(f"best unit ({choice.unit.kind}) {verdict}: score {choice.score:.3f} (needs {THRESHOLD:.3f}) from "
              f"similarity {choice.similarity:.3f}, cover {choice.cover:.2f}, foreign {choice.foreign:.2f}, "
              f"gap {choice.gap:.3f}, {choice.words} question words")
        print("    " + " ".join(choice.text.split())[:400])
    for i, p in enumerate(found.passages, 1):
        print(f"\n[{i}] {p.document}, {p.location}  match={p.matched} fused={p.score:.4f} "
              f"similarity={p.similarity:.3f}")
        print("    " + " ".join(p.text.split())[:400])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-assistant", description=__doc__)
    parser.add_argument("--config", help="config file (default: $EDGE_ASSISTANT_CONFIG or "
                                         "/etc/edge-assistant/config.toml)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default: INFO for run, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="show the hardware, the matched profile and every setting with its reason")
    p.add_argument("--root", default="/", help="root directory to read (a recorded device tree)")
    p.add_argument("--profile", help="force a profile by name")
    p.add_argument("--voice", action="store_true", help="plan as if voice were on (reserves a CPU)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("models", help="list model files, the choice and why")
    p.add_argument("--model-dir")
    p.add_argument("--profile", help="force a profile by name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="answer one question locally, no broker needed")
    p.add_argument("text")
    p.add_argument("--persona")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--model-dir")
    p.add_argument("--profile", help="force a profile by name")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON (with provenance)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare", help="compute what start-up needs ahead of time (guard embeddings, document index)")
    p.add_argument("--model-dir")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="run the daemon: load the model and serve over MQTT (under systemd or not)")
    p.add_argument("--model-dir")
    p.add_argument("--profile", help="force a profile by name")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ask", help="ask a running daemon over MQTT and stream the answer")
    p.add_argument("text")
    _client_options(p)
    p.add_argument("--conversation", help="continue this conversation (1 to 64 characters of your choice)")
    p.add_argument("--forget", action="store_true", help="end the --conversation before asking")
    p.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="talk with a running daemon over MQTT: one conversation, answers streamed "
                                    "with their sources; /forget, /bye")
    p.add_argument("--conversation", help="the conversation's name (default: a new one)")
    _client_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("listen", help="voice from a WAV file: recognize, answer, speak into a WAV file")
    p.add_argument("--wav", required=True, help="speech to recognize")
    p.add_argument("--out", required=True, help="where the spoken answer goes")
    p.add_argument("--persona", help="persona (its languages pick the Vosk model and the Piper voice)")
    p.add_argument("--activation", default="always", choices=["always", "wake"])
    p.add_argument("--wake", help="wake phrase (activation 'wake'; also barge-in)")
    p.add_argument("--realtime", action="store_true", help="pace input and output like a microphone and speaker")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("persona", help="personas: import an Ollama Modelfile")
    psub = p.add_subparsers(dest="action", required=True)
    k = psub.add_parser("import", help="print (or --out) a persona TOML made from an Ollama Modelfile")
    k.add_argument("modelfile", help="the Modelfile")
    k.add_argument("--name", required=True, help="the persona's name")
    k.add_argument("--out", help="write the TOML to this file instead of printing it")
    k.set_defaults(func=cmd_persona)

    p = sub.add_parser("knowledge", help="the plant's documents: index them, list them, search them")
    ksub = p.add_subparsers(dest="action", required=True)
    k = ksub.add_parser("index", help="bring the index up to date with [knowledge] paths")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("list", help="the indexed documents")
    k.add_argument("--json", action="store_true")
    k = ksub.add_parser("search", help="the passages a question finds, with their scores and why")
    k.add_argument("text", nargs="+", help="the question")
    k.add_argument("--limit", type=int, default=5, help="passages to show")
    k.add_argument("--conversation", help="as a follow-up in this conversation of the daemon: shows what of its "
                                          "last turn is carried over, and why")
    k.add_argument("--json", action="store_true")
    for k in ksub.choices.values():
        k.set_defaults(func=cmd_knowledge)
    for p in (*sub.choices.values(), *ksub.choices.values(), *psub.choices.values()):  # also after the command
        p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _client_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that talk to a running daemon over MQTT (``ask``, ``chat``)."""
    p.add_argument("--persona")
    p.add_argument("--device", help="device id of the daemon (default: this host's)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--timeout", type=float, default=120.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(args.log_level or "WARNING").upper(), format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        logsafe.install(handler)
    try:
        return int(args.func(args))
    except EdgeError as exc:
        print(f"edge-assistant: {exc.code}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

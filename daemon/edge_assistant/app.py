"""Wiring: hardware to profile to settings to model choice to a loaded engine and a runtime."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .cpuload import ThreadGovernor
from .engine import Engine, LlamaEmbedder, Runner
from .errors import ModelCorruptError, ModelMissingError
from .guard import Chooser, Embedder, Relevance
from .hardware import HardwareInfo, detect
from .knowledge import Retriever, build_index
from .models import ModelChoice, choose, expected_sha256, inspect, scan, verify
from .pipeline import Closable, Runtime
from .profiles import Settings, default_profiles_dir, load_profiles, match, resolve

log = logging.getLogger(__name__)

Step = Callable[[str], None]
"""Told each start-up step as it begins ("loading <file>", "indexing the documents of ..."), so that a step that
hangs can be named."""


def _quiet(_what: str) -> None:
    pass


@dataclass(frozen=True)
class Plan:
    """Everything decided before the model is loaded."""

    hardware: HardwareInfo
    """What the machine is."""
    settings: Settings
    """The profile's settings after overrides, with reasons."""
    choice: ModelChoice
    """The model file and context."""
    unreadable: tuple[str, ...]
    """Model files that could not be read, each with why."""


def plan_settings(config: Config, root: Path = Path("/"), voice: bool = False) -> tuple[HardwareInfo, Settings]:
    """Detect the hardware and resolve its profile."""
    hw = detect(root)
    profiles_dir = Path(config.profile.dir) if config.profile.dir else default_profiles_dir()
    profile, why = match(hw, load_profiles(profiles_dir), config.profile.name)
    return hw, resolve(profile, hw, config.profile, voice=voice, why_profile=why)


def plan(config: Config, root: Path = Path("/"), voice: bool = False) -> Plan:
    """Detect, match a profile, and choose a model; loads nothing."""
    hw, settings = plan_settings(config, root, voice)
    budget = int(hw.memory_limit * settings.memory_share)
    directory = config.model.directory()
    if config.model.file:
        path = Path(config.model.file)
        path = path if path.is_absolute() else directory / path
        if not path.is_file():
            raise ModelMissingError(f"{path}: model file not found (model.file in config)")
        infos, unreadable = [inspect(path)], list[str]()
    else:
        infos, unreadable = scan(directory)
        if not infos and unreadable:  # files are there, but none is a readable model: corrupt, not missing
            raise ModelCorruptError(f"{directory}: no readable GGUF model ({'; '.join(unreadable)})")
        if not infos:
            raise ModelMissingError(f"{directory}: no GGUF model. Fetch the default model with "
                                    f"scripts/fetch_models.py --model-dir {directory} (in a checkout, scripts/setup "
                                    "fetches it into models/, which scripts/start uses), or set model.dir or "
                                    "$EDGE_ASSISTANT_MODEL_DIR")
    choice = choose(infos, settings.quant_order, budget, settings.n_ctx, config.model.min_ctx, settings.parallel,
                    settings.determinism, offloaded=settings.n_gpu_layers != 0)
    return Plan(hw, settings, choice, tuple(unreadable))


def load(config: Config, the_plan: Plan, step: Step = _quiet) -> Runtime:
    """Verify the chosen file's SHA-256, load it, index the documents, and build the runtime; ``step`` is told
    each step as it begins."""
    path = the_plan.choice.info.path
    step(f"checking the SHA-256 of {path.name}")
    sha = verify(path, expected_sha256(path, config.model.sha256))
    step(f"loading {path.name}")
    engine = Engine.load(the_plan.choice, the_plan.settings, sha)
    embedder = None
    try:
        embedder = load_embedder(config, the_plan, sha, engine.governor, engine.run, step)
        knowledge = open_knowledge(config, embedder, step=step)
        return build_runtime(config, the_plan, engine, embedder, knowledge, step)
    except BaseException:  # a bad adapter or index: nothing of the half-built runtime stays mapped
        for part in (embedder, engine):
            if part is not None:
                part.close()
        raise


def build_runtime(config: Config, the_plan: Plan, engine: Engine, embedder: LlamaEmbedder | None,
                  knowledge: Retriever | None, step: Step = _quiet) -> Runtime:
    """A runtime from loaded parts (a reload that keeps the model passes the running engine and embedder)."""
    chooser = engine if isinstance(engine, Chooser) else None
    adapters = engine.load_adapters({f"personas.{name}.adapter": p.adapter_path(config.model.directory())
                                     for name, p in config.personas.items() if p.adapter})
    if embedder is not None:
        step("embedding the guard's examples")
    cache = embedder.cache_path.parent if embedder is not None and embedder.cache_path is not None else None
    relevance = relevance_layers(config, embedder, chooser, knowledge, cache)
    resources: list[Closable] = [engine]
    if embedder is not None:
        resources.append(embedder)
    if knowledge is not None:
        resources.append(knowledge)
    return Runtime(config=config, engine=engine, relevance=relevance, knowledge=knowledge, embedder=embedder,
                   model_file=the_plan.choice.info.path.name, quantization=the_plan.choice.info.quantization,
                   profile=the_plan.settings.profile, resources=tuple(resources), adapters=adapters)


def relevance_layers(config: Config, embedder: Embedder | None, chooser: Chooser | None,
                     knowledge: Retriever | None, cache_dir: Path | None = None) -> dict[str, Relevance]:
    """Each persona's relevance layer. A persona that answers from the documents learns from their sentences (the
    index's vectors, from the same sentence-embedding model) as on-topic evidence: what they talk about is on
    topic. The trained classifiers are cached in ``cache_dir`` (beside the embedding cache; None: not cached)."""
    evidence = knowledge.vectors if knowledge is not None and knowledge.dense else None
    return {name: Relevance(p.guard, embedder, chooser, evidence=evidence if p.knowledge.enabled else None,
                            cache_dir=cache_dir)
            for name, p in config.personas.items()}


def open_knowledge(config: Config, embedder: LlamaEmbedder | None = None, reindex: bool = True,
                   step: Step = _quiet) -> Retriever | None:
    """Bring the index up to date with ``[knowledge] paths`` and open it; None when no documents are configured.

    A sentence-embedding model (``embedder`` of kind ``sentence``) gives the passages vectors, and retrieval goes by
    meaning as well as words; a chat model's hidden states are no sentence embedding, and are not used for it.
    """
    if not config.knowledge.paths:
        waiting = sorted(name for name, p in config.personas.items()
                         if p.knowledge.enabled and p.knowledge.fallback == "refuse")
        if waiting:
            log.warning("knowledge: no documents are configured ([knowledge] paths is empty): persona(s) %s answer "
                        "only from documents and refuse every question with no_documents", ", ".join(waiting))
        return None
    sentence = embedder if embedder is not None and embedder.kind == "sentence" else None
    if sentence is None:
        log.warning("knowledge: no sentence-embedding model is loaded: questions are matched to the documents by "
                    "their words only (set [model] embedding; scripts/setup fetches all-MiniLM-L6-v2)")
    if reindex:
        step(f"indexing the documents of {', '.join(config.knowledge.paths)}")
        build_index(config.knowledge, sentence)
    return Retriever.open(config.knowledge, sentence)


def knowledge_embedder(config: Config) -> LlamaEmbedder | None:
    """The sentence-embedding model for indexing and searching the documents outside the daemon (``knowledge``
    commands): that of ``[model] embedding``, when it is there; None (words only) otherwise."""
    path = config.model.embedding_path()
    if path is None or not path.is_file():
        return None
    _hw, settings = plan_settings(config)
    return _open_embedder(path, settings.n_threads)


def needs_embedder(config: Config) -> bool:
    """Whether ``config`` needs an embedding model: a persona's guard judges relevance by embeddings, or a persona
    answers from documents (their passages are embedded, to be retrieved by meaning)."""
    guard = any(p.guard.relevance == "embedding" and p.guard.strictness != "off" and p.guard.on_topic
                for p in config.personas.values())
    return guard or (bool(config.knowledge.paths) and any(p.knowledge.enabled for p in config.personas.values()))


def load_embedder(config: Config, the_plan: Plan, sha256: str, governor: ThreadGovernor | None = None,
                  runner: Runner | None = None, step: Step = _quiet) -> LlamaEmbedder | None:
    """The guard's embedding model, when a persona's guard uses embeddings: the sentence-embedding model of
    ``[model] embedding`` (checked against its ``.sha256`` sidecar), or a second context on the chat model.

    The guard examples' embeddings are kept beside the embedding model, named by its SHA-256, so a restart does
    not embed them again.
    """
    if not needs_embedder(config):
        return None
    path = config.model.embedding_path()
    if path is None:
        path = the_plan.choice.info.path
    else:
        if not path.is_file():
            raise ModelMissingError(f"{path}: the guard's sentence-embedding model is missing. Run scripts/setup "
                                    "(or scripts/fetch_models.py --only embedding), or set model.embedding = \"\" "
                                    "to embed with the chat model")
        sha256 = verify(path, expected_sha256(path))
        inspect(path)  # a truncated or foreign file: ModelCorruptError naming it, before llama.cpp sees it
    cache = path.with_name(f".{path.name}.{sha256[:16]}.embeddings.npz")
    step(f"loading the guard's embedding model {path.name}")
    return _open_embedder(path, the_plan.settings.n_threads, cache, governor, runner)


def _open_embedder(path: Path, n_threads: int, cache: Path | None = None, governor: ThreadGovernor | None = None,
                   runner: Runner | None = None) -> LlamaEmbedder:
    """``LlamaEmbedder.load``, a file llama.cpp refuses being ``ModelCorruptError`` naming it."""
    try:
        return LlamaEmbedder.load(str(path), n_threads, cache, governor, runner)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ModelCorruptError(f"{path}: llama.cpp cannot load it as an embedding model ({exc})") from exc

"""Wiring: hardware to profile to settings to model choice to a loaded engine and a pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .engine import Embedder, Engine
from .errors import ModelMissingError
from .hardware import HardwareInfo, detect
from .models import ModelChoice, choose, expected_sha256, inspect, scan, verify
from .pipeline import Pipeline
from .profiles import Settings, default_profiles_dir, load_profiles, match, resolve

log = logging.getLogger(__name__)


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
        if not infos:
            detail = f" ({'; '.join(unreadable)})" if unreadable else ""
            raise ModelMissingError(f"{directory}: no readable GGUF model{detail}. Run scripts/setup to fetch "
                                    "the default model, or set model.dir")
    choice = choose(infos, settings.quant_order, budget, settings.n_ctx, config.model.min_ctx)
    return Plan(hw, settings, choice, tuple(unreadable))


def load(config: Config, the_plan: Plan) -> tuple[Engine, Pipeline]:
    """Verify the chosen file's SHA-256, load it, and build the pipeline."""
    path = the_plan.choice.info.path
    sha = verify(path, expected_sha256(path, config.model.sha256))
    engine = Engine.load(the_plan.choice, the_plan.settings, sha)
    embedder = load_embedder(config, the_plan, sha)
    pipeline = Pipeline(config, engine, profile=the_plan.settings.profile,
                        quantization=the_plan.choice.info.quantization, model_file=path.name, embedder=embedder)
    return engine, pipeline


def load_embedder(config: Config, the_plan: Plan, sha256: str) -> Embedder | None:
    """An embedding context on the chosen model, when a persona's guard uses embeddings.

    The guard examples' embeddings are kept beside the model, named by its SHA-256, so a restart does not
    embed them again.
    """
    needed = any(p.guard.relevance == "embedding" and p.guard.strictness != "off" and p.guard.on_topic
                 for p in config.personas.values())
    if not needed:
        return None
    path = the_plan.choice.info.path
    cache = path.with_name(f".{path.name}.{sha256[:16]}.embeddings.npz")
    return Embedder.load(str(path), the_plan.settings.n_threads, cache)

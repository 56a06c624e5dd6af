"""Hardware profiles: data files with first-match rules, resolved into runtime settings with reasons.

A profile (``hw_profiles/*.toml``) says which machines it is for (``[match]``) and how to run a model on them
(``[settings]``). Profiles are tried in ``order``; the first whose every condition holds wins; a generic profile
with an empty ``[match]`` catches the rest. The config file may force a profile and override any setting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .hardware import HardwareInfo
from .tomlconf import build, load_toml

log = logging.getLogger(__name__)

ThreadPolicy = Literal["all", "big", "physical"]
Determinism = Literal["invariant", "per-request"]

MAX_PARALLEL = 256
"""llama.cpp's limit on sequences in one context (``llama_max_parallel_sequences``)."""


@dataclass(frozen=True)
class MatchRule:
    """Conditions a machine must meet; every given one must hold. Lists of strings match any item."""

    board: tuple[str, ...] = ()
    """Substrings of the board name (device-tree model or DMI product name); any one matches."""
    compatible: tuple[str, ...] = ()
    """Device-tree compatible strings; any one present matches."""
    arch: tuple[str, ...] = ()
    """Architectures (``aarch64``, ``x86_64``, ``armv7l``); any one matches."""
    features: tuple[str, ...] = ()
    """CPU features that must all be present."""
    not_features: tuple[str, ...] = ()
    """CPU features that must all be absent."""
    cuda: bool | None = None
    """Whether a CUDA device must be present (true) or absent (false)."""
    jetson_release: tuple[str, ...] = ()
    """Substrings of the Jetson Linux release line (e.g. ``R32`` for the original Nano); any one matches."""
    soc: tuple[str, ...] = ()
    """Systems-on-chip (e.g. ``tegra234``: every Jetson Orin), from the device tree or the Jetson release."""

    def failures(self, hw: HardwareInfo) -> list[str]:
        """The conditions that do not hold for ``hw`` (empty when the rule matches)."""
        out = []
        if self.board and not any(b.lower() in hw.board.lower() for b in self.board):
            out.append(f"board {hw.board!r} is none of {list(self.board)}")
        if self.compatible and not set(self.compatible) & set(hw.compatible):
            out.append(f"compatible {list(hw.compatible)} has none of {list(self.compatible)}")
        if self.arch and hw.arch not in self.arch:
            out.append(f"arch {hw.arch} not in {list(self.arch)}")
        missing = [f for f in self.features if f not in hw.features]
        if missing:
            out.append(f"CPU lacks {missing}")
        present = [f for f in self.not_features if f in hw.features]
        if present:
            out.append(f"CPU has {present}")
        if self.cuda is not None and hw.cuda != self.cuda:
            out.append(f"cuda is {hw.cuda}, rule wants {self.cuda}")
        if self.jetson_release and not any(r in hw.jetson for r in self.jetson_release):
            out.append(f"Jetson release {hw.jetson!r} matches none of {list(self.jetson_release)}")
        if self.soc and hw.soc not in self.soc:
            out.append(f"SoC {hw.soc or 'unknown'!r} is none of {list(self.soc)}")
        return out


@dataclass(frozen=True)
class ProfileSettings:
    """How to run a model on one class of hardware."""

    quant_order: tuple[str, ...]
    """Quantizations in order of preference (e.g. ``Q4_0`` first on ARM, where llama.cpp repacks it)."""
    threads: ThreadPolicy = "big"
    """Which CPUs generation uses: ``big`` cores only, ``physical`` cores (one per SMT pair), or ``all``."""
    reserve_cpus: int = 0
    """CPUs left free for MQTT and housekeeping, when more than two are usable."""
    voice_reserve_cpus: int = 1
    """Further CPUs left free while voice (recognition, synthesis) runs."""
    max_threads: int = 8
    """Upper bound on generation threads (memory bandwidth saturates well before many cores)."""
    max_threads_offloaded: int | None = None
    """The bound instead while every layer runs on the GPU (the CPU then only feeds it); None: ``max_threads``."""
    batch_threads: Literal["same", "usable"] = "same"
    """Prompt-processing threads: the same as generation, or every usable CPU of the policy."""
    n_ctx: int = 2048
    """Context window in tokens (shrunk by model choice if memory is short)."""
    n_batch: int = 256
    """Logical batch for prompt processing."""
    n_ubatch: int = 256
    """Physical batch for prompt processing."""
    n_gpu_layers: int = 0
    """Layers offloaded to the GPU: 0 none, -1 all."""
    use_mmap: bool = True
    """Memory-map the model file."""
    use_mlock: bool = False
    """Lock the model in RAM (needs ``LimitMEMLOCK``)."""
    memory_share: float = 0.6
    """Share of available memory the model (weights and KV cache) may take."""
    parallel: int = 1
    """Requests decoded together, each in a slot of its own (a KV cache of ``n_ctx`` each); 1: one at a time."""
    determinism: Determinism = "invariant"
    """``invariant``: answers decoded together must equal the same answers decoded alone, byte for byte, so
    ``parallel`` above 1 is only used where that was measured to hold (``models.BATCH_INVARIANT``);
    ``per-request``: allow it anyway (an answer may then depend on what else was decoded beside it)."""

    def __post_init__(self) -> None:
        if not self.quant_order:
            raise ValueError("quant_order: must name at least one quantization")
        for name in ("reserve_cpus", "voice_reserve_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or more")
        if self.max_threads_offloaded is not None and self.max_threads_offloaded < 1:
            raise ValueError("max_threads_offloaded: must be 1 or more")
        for name in ("max_threads", "n_ctx", "n_batch", "n_ubatch", "parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be 1 or more")
        if self.parallel > MAX_PARALLEL:
            raise ValueError(f"parallel: {self.parallel} is more than the {MAX_PARALLEL} slots llama.cpp decodes "
                             "at once")
        if self.n_ubatch > self.n_batch:
            raise ValueError(f"n_ubatch: {self.n_ubatch} is larger than n_batch {self.n_batch}")
        if self.n_gpu_layers < -1:
            raise ValueError("n_gpu_layers: must be -1 (all), 0 (none) or a layer count")
        if not 0.05 <= self.memory_share <= 1.0:
            raise ValueError(f"memory_share: {self.memory_share} is outside 0.05..1.0")


@dataclass(frozen=True)
class Profile:
    """One hardware profile file."""

    name: str
    """Short name, e.g. ``raspberry-pi-5``."""
    description: str
    """One line for people."""
    settings: ProfileSettings
    """What to run with."""
    order: int = 100
    """Profiles are tried in ascending order; the generic fallback has the highest."""
    match: MatchRule = field(default_factory=MatchRule)
    """When this profile applies; an empty rule matches every machine."""
    source: str = ""
    """The file it came from."""


@dataclass(frozen=True)
class ProfileOverrides:
    """The config file's ``[profile]`` table: force a profile by name and override any setting."""

    name: str = ""
    """Use this profile instead of matching."""
    dir: str = ""
    """Directory of profile files (default: the bundled ``hw_profiles``)."""
    quant_order: tuple[str, ...] | None = None
    threads: ThreadPolicy | None = None
    reserve_cpus: int | None = None
    voice_reserve_cpus: int | None = None
    max_threads: int | None = None
    max_threads_offloaded: int | None = None
    batch_threads: Literal["same", "usable"] | None = None
    n_threads: int | None = None
    """A fixed generation thread count, bypassing the thread policy."""
    n_threads_batch: int | None = None
    """A fixed prompt-processing thread count."""
    n_ctx: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    n_gpu_layers: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    memory_share: float | None = None
    parallel: int | None = None
    determinism: Determinism | None = None


@dataclass(frozen=True)
class Settings:
    """The settings the engine runs with, each with the reason it was chosen."""

    profile: str
    quant_order: tuple[str, ...]
    n_threads: int
    n_threads_batch: int
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_gpu_layers: int
    use_mmap: bool
    use_mlock: bool
    memory_share: float
    reasons: Mapping[str, str]
    """Setting name to a sentence saying why it has its value."""
    cpus: tuple[int, ...] = ()
    """The CPUs the threads may run on (the affinity set); empty: all."""
    usable_cpus: int = 0
    """How many CPUs this process can keep busy (affinity, cgroup quota); 0: unknown, the thread plan stands."""
    parallel: int = 1
    """Slots asked for (the model choice may lower it to 1: ``models.slots``)."""
    determinism: Determinism = "invariant"
    """Whether answers decoded together must equal answers decoded alone (see ``ProfileSettings``)."""


def default_profiles_dir() -> Path:
    """``$EDGE_ASSISTANT_PROFILES_DIR``, else ``hw_profiles/`` beside the source tree, else the installed copy."""
    if os.environ.get("EDGE_ASSISTANT_PROFILES_DIR"):
        return Path(os.environ["EDGE_ASSISTANT_PROFILES_DIR"])
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "hw_profiles", Path("/usr/share/edge-assistant/hw_profiles")):
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "hw_profiles"


def load_profiles(directory: Path) -> list[Profile]:
    """Read every ``*.toml`` in ``directory``, sorted by (order, file name)."""
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ConfigError(f"{directory}: no hardware profiles (*.toml) found")
    profiles = []
    for path in files:
        data = load_toml(path)
        data.setdefault("source", str(path))
        profiles.append(build(Profile, data, f"{path.name}: "))
    names = [p.name for p in profiles]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{directory}: profile names used twice: {sorted(dupes)}")
    return sorted(profiles, key=lambda p: (p.order, Path(p.source).name))


def match(hw: HardwareInfo, profiles: Iterable[Profile], forced: str = "") -> tuple[Profile, str]:
    """The first profile whose rule holds for ``hw`` (or the forced one), with the reason."""
    profiles = list(profiles)
    if forced:
        for p in profiles:
            if p.name == forced:
                return p, f"forced by config (profile.name = {forced!r})"
        raise ConfigError(f"profile.name: no profile named {forced!r} (have: {', '.join(p.name for p in profiles)})")
    skipped: list[str] = []
    for p in profiles:
        fails = p.match.failures(hw)
        if not fails:
            why = "first matching rule" + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return p, why
        skipped.append(f"{p.name}: {fails[0]}")
    raise ConfigError("no hardware profile matches this machine and none is a catch-all: " + "; ".join(skipped))


def _threads(policy: ThreadPolicy, hw: HardwareInfo) -> tuple[int, str, int]:
    """CPUs the policy gives, a sentence saying how, and how many usable cores of a slower class it leaves out."""
    allowed = set(hw.affinity)
    usable = [c for c in hw.cpus if c.index in allowed] or list(hw.cpus)
    fast, slow = hw.core_names
    big = set(hw.big_cpus)
    left = 0
    if policy == "all":
        chosen = usable
        what = f"{len(chosen)} CPUs"
    else:
        chosen = [c for c in usable if c.index in big] or usable
        left = len({c.core for c in usable if c not in chosen})
        if policy == "big":
            what = f"{len(chosen)} {fast} cores" if hw.heterogeneous else f"{len(chosen)} CPUs (cores are alike)"
        else:
            what = f"{len({c.core for c in chosen})} {fast + ' ' if hw.heterogeneous else ''}physical cores"
        if left:
            what += f" ({left} {slow} cores left out)"
    n = len({c.core for c in chosen}) if policy == "physical" else len(chosen)
    if len(allowed) < len(hw.cpus):
        what += f" within the affinity mask {sorted(allowed)}"
    if hw.cpu_quota is not None and hw.usable_cpus < n:
        n = hw.usable_cpus
        what += f", capped to {n} by the cgroup quota of {hw.cpu_quota:g} CPUs"
    return max(1, n), what, left


def threads_under_load(planned: int, usable_cpus: int, others_busy: float) -> int:
    """Threads to run now: ``planned``, but none on a CPU that other processes keep busy.

    ``others_busy`` is how many CPUs other processes use (0.5 or more of a CPU counts as one taken). llama.cpp's
    threads wait for each other at every step, so a thread that must share its CPU holds all of them back.
    """
    if usable_cpus <= 0:
        return planned
    taken = math.floor(others_busy + 0.5)
    return max(1, min(planned, usable_cpus - taken))


def resolve(profile: Profile, hw: HardwareInfo, overrides: ProfileOverrides | None = None,
            voice: bool = False, why_profile: str = "") -> Settings:
    """Turn a profile and the hardware into concrete settings, with a reason for each."""
    ov = overrides or ProfileOverrides()
    s = profile.settings
    changed = {f.name: getattr(ov, f.name) for f in fields(ProfileSettings) if getattr(ov, f.name) is not None}
    try:
        s = replace(s, **changed)  # re-validated in __post_init__
    except ValueError as exc:  # an override out of range: the message names the setting
        raise ConfigError(f"profile.{exc}") from exc
    src = {k: ("config override" if k in changed else f"profile {profile.name}") for k in
           (f.name for f in fields(ProfileSettings))}
    reasons: dict[str, str] = {"profile": f"{profile.name}: {profile.description} ({why_profile or 'matched'})"}

    base, what, left = _threads(s.threads, hw)
    wanted = s.reserve_cpus + (s.voice_reserve_cpus if voice else 0)
    spare = min(left, max(0, hw.usable_cpus - base))  # slower cores left out, and free under the quota
    reserve = max(0, wanted - spare) if base > 2 else 0
    if base <= 2:
        reserve_why = "no reserve with 2 or fewer CPUs"
    elif wanted and spare:
        served = "MQTT, housekeeping and voice" if voice else "MQTT and housekeeping"
        left_why = f"the {spare} {hw.core_names[1]} cores left out serve {served}"
        reserve_why = f"{reserve} kept free beside {left_why}" if reserve else f"none kept free: {left_why}"
    else:
        reserve_why = f"{s.reserve_cpus} kept for MQTT and housekeeping" if s.reserve_cpus else "no reserve"
        if voice and s.voice_reserve_cpus:
            reserve_why += f", {s.voice_reserve_cpus} more for voice"
    n_gpu = s.n_gpu_layers if (s.n_gpu_layers == 0 or hw.cuda) else 0
    cap, cap_src = s.max_threads, src["max_threads"]
    if n_gpu == -1 and s.max_threads_offloaded is not None:
        cap, cap_src = s.max_threads_offloaded, f"{src['max_threads_offloaded']}, every layer on the GPU"
    n_threads = max(1, min(base - reserve, cap))
    reasons["n_threads"] = (f"{n_threads}: policy '{s.threads}' ({src['threads']}) gives {what}; {reserve_why}; "
                            f"at most {cap} ({cap_src})")
    reasons["n_threads"] += "; fewer while other processes keep these CPUs busy"
    if ov.n_threads is not None:
        n_threads = ov.n_threads
        reasons["n_threads"] = (f"{n_threads}, whatever else runs: config override "
                                f"(policy would give {reasons['n_threads']})")
    if s.batch_threads == "usable":
        n_batch_threads = max(n_threads, min(base, cap))
        reasons["n_threads_batch"] = f"{n_batch_threads}: every CPU of the policy (prompt processing is short)"
    else:
        n_batch_threads = n_threads
        reasons["n_threads_batch"] = f"{n_batch_threads}: same as n_threads"
    if ov.n_threads_batch is not None:
        n_batch_threads = ov.n_threads_batch
        reasons["n_threads_batch"] = f"{n_batch_threads}: config override"

    if s.n_gpu_layers != 0 and not hw.cuda:
        reasons["n_gpu_layers"] = (f"0: {src['n_gpu_layers']} asks {s.n_gpu_layers}, but no CUDA device "
                                   f"({hw.cuda_reason})")
    else:
        gpu_what = "all layers" if n_gpu == -1 else f"{n_gpu} layers"
        reasons["n_gpu_layers"] = f"{n_gpu}: {gpu_what} on the GPU ({src['n_gpu_layers']}; {hw.cuda_reason})"
    for key in ("quant_order", "n_ctx", "n_batch", "n_ubatch", "use_mmap", "use_mlock", "memory_share", "parallel",
                "determinism"):
        value = getattr(s, key)
        shown = ", ".join(value) if isinstance(value, tuple) else value
        reasons[key] = f"{shown}: {src[key]}"
    if s.parallel > 1:
        reasons["parallel"] += "; a KV cache of n_ctx for each slot counts in the memory budget"
        reasons["parallel"] += ("; kept only for a model whose answers decoded together equal its answers decoded "
                                "alone" if s.determinism == "invariant" else
                                "; determinism is per-request: kept for any model")
    if s.use_mlock:
        reasons["use_mlock"] += " (needs LimitMEMLOCK=infinity under systemd)"
    return Settings(
        profile=profile.name,
        quant_order=s.quant_order,
        n_threads=n_threads,
        n_threads_batch=n_batch_threads,
        n_ctx=s.n_ctx,
        n_batch=s.n_batch,
        n_ubatch=s.n_ubatch,
        n_gpu_layers=n_gpu,
        use_mmap=s.use_mmap,
        use_mlock=s.use_mlock,
        memory_share=s.memory_share,
        reasons=reasons,
        cpus=tuple(sorted(hw.affinity)),
        usable_cpus=0 if ov.n_threads is not None else hw.usable_cpus,
        parallel=s.parallel,
        determinism=s.determinism,
    )

"""Hardware detection as a pure function of a root directory.

``detect(Path("/"))`` reads the live machine; tests pass a directory holding recorded ``proc/``, ``sys/`` and
``etc/`` trees of real devices. Nothing here calls the kernel directly, so a recorded tree and the live machine
go through the same code.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ARM_FEATURES = ("asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16", "neon", "vfpv4", "idiva")
X86_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Cpu:
    """One logical CPU."""

    index: int
    """The kernel's CPU number."""
    core: tuple[int, int]
    """(package, core) pair: logical CPUs with the same pair are SMT siblings."""
    capacity: int | None
    """``cpu_capacity`` from sysfs (1024 = the fastest core), when the kernel reports it."""
    max_khz: int | None
    """``cpufreq/cpuinfo_max_freq`` in kHz, when present."""
    part: str
    """The ARM ``CPU part`` id (e.g. ``0xd0b`` for Cortex-A76) or the x86 model name."""
    kind: str = ""
    """``performance`` or ``efficiency`` on a hybrid x86 chip (``/sys/devices/cpu_core|cpu_atom/cpus``), else ``""``."""
    rank: int | None = None
    """The Arm core's class from ``hardware_data.toml`` (higher is faster), when its part number is known."""
    core_name: str = ""
    """The Arm core's name (e.g. ``Cortex-A76``), when its part number is known."""


@dataclass(frozen=True)
class Thermal:
    """One thermal zone reading."""

    zone: str
    """The zone's ``type`` (e.g. ``cpu-thermal``)."""
    celsius: float
    """The temperature when read."""


@dataclass(frozen=True)
class HardwareInfo:
    """What the machine is, as read from its root directory."""

    arch: str
    """``aarch64``, ``x86_64``, ``armv7l`` or ``unknown``."""
    board: str
    """Device-tree model (e.g. ``Raspberry Pi 5 Model B Rev 1.0``), or the DMI product name, or ``""``."""
    compatible: tuple[str, ...]
    """Device-tree ``compatible`` strings, most specific first."""
    cpu_model: str
    """The CPU's model name, when the kernel gives one."""
    features: frozenset[str]
    """CPU feature flags that matter for llama.cpp kernels (a subset of ``/proc/cpuinfo``'s list)."""
    cpus: tuple[Cpu, ...]
    """Every logical CPU the kernel lists."""
    affinity: tuple[int, ...]
    """CPUs this process may run on (``Cpus_allowed_list``); all CPUs if unknown."""
    cpu_quota: float | None
    """The cgroup v2 CPU quota in CPUs (``cpu.max``), the tightest along the cgroup path; None if unlimited."""
    mem_total: int
    """Physical memory in bytes."""
    mem_available: int
    """``MemAvailable`` in bytes when read."""
    mem_cgroup_limit: int | None
    """The cgroup v2 ``memory.max`` in bytes, the tightest along the path; None if unlimited."""
    jetson: str
    """The Jetson Linux release line (``# R36 (release), REVISION: 4.3 ...``) or ``""``."""
    cuda: bool
    """Whether a CUDA-capable GPU is present (Jetson, or an NVIDIA driver)."""
    cuda_reason: str
    """What showed the CUDA device, or why none was found."""
    thermal: tuple[Thermal, ...] = field(default=())
    """Thermal zone readings."""
    soc: str = ""
    """The system-on-chip (e.g. ``tegra234``, ``rk3588``): a compatible string or Jetson module that
    ``hardware_data.toml`` knows, or what a Jetson release implies, else the last compatible string's tail; ``""``
    when unknown (see ``_soc``)."""

    @property
    def big_cpus(self) -> tuple[int, ...]:
        """CPUs of the fastest class (all of them on a machine whose cores are alike)."""
        fastest = core_classes(self.cpus)[0]
        return tuple(c.index for c in self.cpus if c.index in fastest)

    @property
    def heterogeneous(self) -> bool:
        """True on big.LITTLE (or P/E-core) machines."""
        return len(core_classes(self.cpus)[0]) < len(self.cpus)

    @property
    def core_names(self) -> tuple[str, str]:
        """What the fastest class and the others are called: ``performance``/``efficiency`` or ``big``/``little``."""
        return core_classes(self.cpus)[1]

    @property
    def physical_cores(self) -> int:
        """Distinct physical cores among all CPUs."""
        return len({c.core for c in self.cpus}) or 1

    @property
    def usable_cpus(self) -> int:
        """CPUs this process can keep busy: the affinity set, capped by the cgroup quota (at least 1)."""
        n = len(self.affinity)
        if self.cpu_quota is not None:
            n = min(n, max(1, math.floor(self.cpu_quota)))
        return max(1, n)

    @property
    def memory_limit(self) -> int:
        """Memory the daemon may count on: available memory, capped by the cgroup limit."""
        limit = self.mem_available or self.mem_total
        if self.mem_cgroup_limit is not None:
            limit = min(limit, self.mem_cgroup_limit)
        return limit


def core_classes(cpus: tuple[Cpu, ...]) -> tuple[set[int], tuple[str, str]]:
    """Indices of the CPUs in the fastest class, and what the classes are called.

    In order: the kernel's hybrid split (Intel P- and E-cores), ``cpu_capacity``, the maximum clock, then the
    Arm part numbers in ``hardware_data.toml``; the first that every CPU has decides.
    """
    kinds = {c.kind for c in cpus}
    if "performance" in kinds and "efficiency" in kinds:
        return {c.index for c in cpus if c.kind == "performance"}, ("performance", "efficiency")
    for key in ("capacity", "max_khz", "rank"):
        values = [getattr(c, key) for c in cpus]
        if values and all(v is not None for v in values):
            top = max(values)
            # Cores within 5% of the top count as big (kernels report 1024 vs 1018 on some boards).
            return {c.index for c in cpus if getattr(c, key) >= top * 0.95}, ("big", "little")
    return {c.index for c in cpus}, ("big", "little")


@functools.cache
def hardware_data() -> dict[str, Any]:
    """``hardware_data.toml``: Arm core parts, SoC compatible strings, Jetson modules and single-SoC releases."""
    return tomllib.loads(resources.files(__package__).joinpath("hardware_data.toml").read_text())


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
        return None
    except OSError as exc:  # e.g. EINVAL from some sysfs attributes
        log.debug("cannot read %s: %s", rel, exc)
        return None


def _read_int(root: Path, rel: str) -> int | None:
    text = _read(root, rel)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse a kernel CPU list such as ``0-3,6,8-9``."""
    out: list[int] = []
    for raw in text.strip().split(","):
        part = raw.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return tuple(sorted(set(out)))


def _cpuinfo_blocks(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split ``/proc/cpuinfo`` into per-processor blocks and the rest (ARM's board lines, shared features).

    Older 32-bit ARM kernels print ``Processor : ARMv7 Processor rev 4 (v7l)`` (the model, not a number) and may
    put ``Features`` and ``CPU part`` once, after the numbered blocks; both are kept in the rest.
    """
    blocks: list[dict[str, str]] = []
    board: dict[str, str] = {}
    current: dict[str, str] = {}
    for raw in [*text.splitlines(), ""]:
        line = raw.strip()
        if not line:
            if current.get("processor", "").isdigit():
                blocks.append(current)
            else:
                board.update(current)
            current = {}
            continue
        if ":" in line:
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if key == "processor" and not value.isdigit():
                if value and not value[0].isdigit():  # "Processor : ARMv7 ..." is the model name
                    board.setdefault("model name", value)
                continue
            current[key] = value
    return blocks, board


def _cgroup_path(root: Path) -> Path | None:
    text = _read(root, "proc/self/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return Path(line[3:].strip().lstrip("/"))
    return None


def _cgroup_walk(root: Path, name: str) -> list[str]:
    """Values of a cgroup v2 file from this process's cgroup up to the root."""
    rel = _cgroup_path(root)
    base = Path("sys/fs/cgroup")
    values = []
    paths = [rel, *rel.parents] if rel is not None else [Path()]
    for p in paths:
        text = _read(root, str(base / p / name))
        if text is not None:
            values.append(text.strip())
    return values


def _cpu_quota(root: Path) -> float | None:
    quotas = []
    for value in _cgroup_walk(root, "cpu.max"):
        parts = value.split()
        if len(parts) == 2 and parts[0] != "max":
            quotas.append(int(parts[0]) / int(parts[1]))
    return min(quotas) if quotas else None


def _mem_cgroup(root: Path) -> int | None:
    limits = [int(v) for v in _cgroup_walk(root, "memory.max") if v.isdigit()]
    return min(limits) if limits else None


def _meminfo(root: Path) -> tuple[int, int]:
    text = _read(root, "proc/meminfo") or ""
    values = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            values[m.group(1)] = int(m.group(2)) * 1024
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", total))


def _arch(root: Path, blocks: list[dict[str, str]], rest: dict[str, str]) -> str:
    text = _read(root, "proc/sys/kernel/arch")
    if text:
        return text.strip()
    first = {**rest, **(blocks[0] if blocks else {})}
    if "vendor_id" in first or "flags" in first:
        return "x86_64" if " lm " in f" {first.get('flags', '')} " else "i686"
    arch = first.get("cpu architecture", "")
    if arch == "8":
        # A 32-bit kernel on an ARMv8 core reports "model name : ARMv7 ..." and 32-bit features.
        return "armv7l" if "ARMv7" in first.get("model name", "") else "aarch64"
    if arch == "7":
        return "armv7l"
    return "unknown"


def _thermal(root: Path) -> tuple[Thermal, ...]:
    base = root / "sys/class/thermal"
    out = []
    if base.is_dir():
        for zone in sorted(base.glob("thermal_zone*")):
            milli = _read_int(root, str(zone.relative_to(root) / "temp"))
            kind = (_read(root, str(zone.relative_to(root) / "type")) or zone.name).strip()
            if milli is not None:
                out.append(Thermal(kind, milli / 1000.0))
    return tuple(out)


def _soc(compatible: tuple[str, ...], jetson: str) -> str:
    """The system-on-chip, from what ``hardware_data.toml`` knows, else the device tree's last string.

    A device tree lists its compatible strings from the most specific to the most general, and a general one may
    follow the SoC's (NVIDIA's trees end in ``nvidia,tegra23x``, a family, after ``nvidia,tegra234``). So the first
    string found in ``[socs]`` names the SoC; failing that, the first NVIDIA module part number in ``[jetson_modules]``
    (``nvidia,p3737-0000+p3701-0005`` holds module p3701, an AGX Orin); failing that, a Jetson Linux release that
    runs on one SoC only (``[jetson_releases]``, for a container without a device tree); and only when nothing is
    known, the tail of the last compatible string.
    """
    data = hardware_data()
    socs: dict[str, str] = data.get("socs", {})
    for name in compatible:
        if name in socs:
            return socs[name]
    modules: dict[str, dict[str, str]] = data.get("jetson_modules", {})
    for name in compatible:
        vendor, _, board = name.partition(",")
        if vendor != "nvidia":
            continue
        for part in re.findall(r"(?:^|\+)(p\d{4})-\d{4}", board):
            if part in modules:
                return modules[part]["soc"]
    release = re.match(r"#\s*(R\d+)", jetson)
    if release:
        soc = str(data.get("jetson_releases", {}).get(release.group(1), ""))
        if soc:
            return soc
    if compatible:
        return compatible[-1].split(",")[-1]
    return ""


def _cpu_count(blocks: list[dict[str, str]], rest: dict[str, str], root: Path) -> list[int]:
    """CPU numbers: the numbered cpuinfo blocks, unless sysfs or the blocks' own counts say there are more."""
    listed = [int(b["processor"]) for b in blocks]
    for rel in ("sys/devices/system/cpu/present", "sys/devices/system/cpu/online"):
        known = list(parse_cpu_list(_read(root, rel) or ""))
        if len(known) > len(listed):
            listed = known
    siblings = (blocks[0] if blocks else rest).get("siblings", "")
    if siblings.isdigit() and int(siblings) > len(listed) and len(blocks) <= 1:
        listed = list(range(int(siblings)))
    return listed or [0]


def _cores_from_counts(cpus: list[Cpu], counts: dict[int, tuple[str, str]]) -> list[Cpu]:
    """SMT pairs from ``siblings`` and ``cpu cores`` where nothing names each CPU's core.

    ``/proc/cpuinfo`` without ``core id`` lines (dumps rebuilt from ``lscpu``, some containers) still says, per
    package, how many logical CPUs (``siblings``) run on how many cores (``cpu cores``): ``siblings - cpu cores`` of
    them are second threads of a core. How the kernel numbers them:

    - none: every CPU is a core of its own;
    - every core has two: the first thread of every core, then the second (CPU ``i`` and ``i + cores`` pair), as
      Linux numbers Intel and AMD chips whose cores are alike;
    - some cores have two, others one (Intel's hybrids, where only the performance cores have SMT): the SMT cores'
      threads come first, in adjacent pairs (0, 1), (2, 3), ..., then the single-threaded cores.

    The number of physical cores is what the counts fix; the pairing is the kernel's usual numbering. A package
    whose listed CPUs are not ``siblings`` in number (a partial or renumbered cpuinfo) is left as it is.
    """
    by_package: dict[int, list[int]] = {}
    for pos, c in enumerate(cpus):
        by_package.setdefault(c.core[0], []).append(pos)
    out = list(cpus)
    for package, positions in by_package.items():
        siblings, cores = counts.get(package, ("", ""))
        if not (siblings.isdigit() and cores.isdigit()):
            continue
        n_cpus, n_cores = int(siblings), int(cores)
        if n_cpus != len(positions) or not 0 < n_cores <= n_cpus <= 2 * n_cores:
            continue
        smt = n_cpus - n_cores  # cores with two threads
        for i, pos in enumerate(positions):
            if smt == n_cores:
                core = i % n_cores
            elif i < 2 * smt:
                core = i // 2
            else:
                core = i - smt
            out[pos] = replace(cpus[pos], core=(package, core))
    return out


def _hybrid_by_smt(cpus: list[Cpu], cpu_vendor: str) -> list[Cpu]:
    """Intel P- and E-cores told apart by SMT where the kernel does not split them (before Linux 5.13).

    On Intel hybrid chips only the performance cores have two threads; a chip whose cores are alike has SMT on
    all of them or none. So on Intel, cores with two threads beside cores with one are the performance cores.
    """
    if cpu_vendor != "GenuineIntel" or any(c.kind for c in cpus):
        return cpus
    threads: dict[tuple[int, int], int] = {}
    for c in cpus:
        threads[c.core] = threads.get(c.core, 0) + 1
    if len(set(threads.values())) < 2 or max(threads.values()) < 2:
        return cpus
    return [replace(c, kind="performance" if threads[c.core] > 1 else "efficiency") for c in cpus]


def _cuda(root: Path, compatible: tuple[str, ...], board: str, jetson: str) -> tuple[bool, str]:
    if jetson:
        return True, "Jetson Linux release file etc/nv_tegra_release"
    if any(c.startswith("nvidia,tegra") or c.startswith("nvidia,p3") for c in compatible):
        return True, f"device-tree compatible {next(c for c in compatible if c.startswith('nvidia,'))}"
    if "jetson" in board.lower():
        return True, f"board {board!r}"
    version = _read(root, "proc/driver/nvidia/version")
    if version:
        return True, "NVIDIA driver (proc/driver/nvidia/version)"
    if (root / "dev/nvidia0").exists():
        return True, "device node dev/nvidia0"
    return False, "no Jetson release file, no NVIDIA driver, no dev/nvidia0"


def detect(root: Path = Path("/")) -> HardwareInfo:
    """Read the hardware of the machine whose root directory is ``root``."""
    blocks, board_block = _cpuinfo_blocks(_read(root, "proc/cpuinfo") or "")
    arch = _arch(root, blocks, board_block)
    board = (_read(root, "proc/device-tree/model") or "").replace("\x00", "").strip()
    if not board:
        board = board_block.get("model", "")
    if not board:
        board = (_read(root, "sys/class/dmi/id/product_name") or "").strip()
    compatible = tuple(s for s in (_read(root, "proc/device-tree/compatible") or "").split("\x00") if s)

    flags: set[str] = set((board_block.get("flags") or board_block.get("features") or "").split())
    cpus: list[Cpu] = []
    indices = _cpu_count(blocks, board_block, root)
    performance = set(parse_cpu_list(_read(root, "sys/devices/cpu_core/cpus") or ""))
    efficiency = set(parse_cpu_list(_read(root, "sys/devices/cpu_atom/cpus") or ""))
    parts = hardware_data().get("parts", {})
    by_number = {int(b["processor"]): b for b in blocks}
    core_known = False  # whether sysfs or cpuinfo names any CPU's core
    counts: dict[int, tuple[str, str]] = {}  # package: (siblings, cpu cores) from cpuinfo
    for pos, idx in enumerate(indices):
        # A CPU without a block of its own (a partial cpuinfo) is taken to be like the nearest one listed.
        own = by_number.get(idx, {})
        b = {**board_block, **(own or (blocks[min(pos, len(blocks) - 1)] if blocks else {}))}
        flags.update((b.get("flags") or b.get("features") or "").split())
        sysdir = f"sys/devices/system/cpu/cpu{idx}"
        package = _read_int(root, f"{sysdir}/topology/physical_package_id")
        core = _read_int(root, f"{sysdir}/topology/core_id")
        if package is None:
            package = int(b.get("physical id", "0") or 0)
        if core is None:  # only a CPU's own block says which core it is on
            core = int(own["core id"]) if own.get("core id", "").isdigit() else None
        if core is None:
            core = idx
        else:
            core_known = True
        counts.setdefault(package, (b.get("siblings", ""), b.get("cpu cores", "")))
        known = parts.get(f"{b.get('cpu implementer', '')}:{b.get('cpu part', '')}".lower(), {})
        cpus.append(Cpu(
            index=idx,
            core=(package, core),
            capacity=_read_int(root, f"{sysdir}/cpu_capacity"),
            max_khz=_read_int(root, f"{sysdir}/cpufreq/cpuinfo_max_freq"),
            part=b.get("cpu part") or b.get("model name", ""),
            kind="performance" if idx in performance else "efficiency" if idx in efficiency else "",
            rank=known.get("rank"),
            core_name=known.get("name", ""),
        ))
    vendor = next((b["vendor_id"] for b in [*blocks, board_block] if "vendor_id" in b), "")
    if not core_known:
        cpus = _cores_from_counts(cpus, counts)
    cpus = _hybrid_by_smt(cpus, vendor)
    known = set(ARM_FEATURES) | set(X86_FEATURES)
    features = frozenset(f for f in flags if f in known)

    status = _read(root, "proc/self/status") or ""
    m = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
    affinity = parse_cpu_list(m.group(1)) if m else tuple(c.index for c in cpus)
    affinity = tuple(i for i in affinity if i in {c.index for c in cpus}) or tuple(c.index for c in cpus)

    mem_total, mem_available = _meminfo(root)
    jetson = (_read(root, "etc/nv_tegra_release") or "").splitlines()[0:1]
    jetson_line = jetson[0].strip() if jetson else ""
    cuda, cuda_reason = _cuda(root, compatible, board, jetson_line)
    cpu_model = next((b["model name"] for b in [*blocks, board_block] if "model name" in b), "")
    return HardwareInfo(
        arch=arch,
        board=board,
        compatible=compatible,
        cpu_model=cpu_model,
        features=features,
        cpus=tuple(cpus),
        affinity=affinity,
        cpu_quota=_cpu_quota(root),
        mem_total=mem_total,
        mem_available=mem_available,
        mem_cgroup_limit=_mem_cgroup(root),
        jetson=jetson_line,
        cuda=cuda,
        cuda_reason=cuda_reason,
        thermal=_thermal(root),
        soc=_soc(compatible, jetson_line),
    )

"""Model choice: scan a directory of GGUF files and pick the one the profile prefers that fits in memory.

Pure apart from reading file headers: no weights are loaded. The memory estimate is the file size (the mapped
weights) plus the KV cache at the chosen context (one per ``parallel`` slot) plus a fixed allowance for compute
buffers.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf

from .errors import ModelChecksumError, ModelCorruptError, ModelMissingError, ModelTooLargeError
from .gguf_header import read_header

log = logging.getLogger(__name__)

MIB = 1024 * 1024
COMPUTE_ALLOWANCE = 64 * MIB
"""Compute buffers and runtime overhead beyond weights and KV cache (an allowance, checked in benchmarks)."""
BATCH_INVARIANT = frozenset({"Q4_0", "Q4_1", "Q8_0"})
"""Quantizations whose answers decoded together (a KV cache per sequence) equalled the same answers decoded alone,
token for token, on llama.cpp's CPU backend (``scripts/bench``, section ``parallel``). Q4_K_M did not."""


@dataclass(frozen=True)
class ModelInfo:
    """What a GGUF header says, enough to choose and to report."""

    path: Path
    """The file."""
    size: int
    """File size in bytes (the weights, memory-mapped)."""
    architecture: str
    """``general.architecture``, e.g. ``llama``."""
    name: str
    """``general.name``."""
    parameters: int
    """Total tensor elements."""
    quantization: str
    """``Q4_0``, ``Q4_K_M``, ... from ``general.file_type``, or the most common tensor type."""
    context_length: int
    """The trained context."""
    n_layer: int
    """Transformer blocks."""
    n_embd: int
    """Embedding width."""
    n_head: int
    """Attention heads."""
    n_head_kv: int
    """Key/value heads (grouped-query attention)."""
    chat_template: bool
    """Whether the file carries a chat template."""

    def kv_bytes(self, n_ctx: int) -> int:
        """KV cache size at ``n_ctx`` with f16 keys and values."""
        head_dim = self.n_embd // max(1, self.n_head)
        return 2 * self.n_layer * n_ctx * self.n_head_kv * head_dim * 2

    def memory_bytes(self, n_ctx: int, slots: int = 1) -> int:
        """Estimated resident memory when loaded with context ``n_ctx`` for each of ``slots`` sequences."""
        return self.size + self.kv_bytes(n_ctx * slots) + COMPUTE_ALLOWANCE


@dataclass(frozen=True)
class ModelChoice:
    """The chosen file and context, with the reasons and what was passed over."""

    info: ModelInfo
    """The chosen model."""
    n_ctx: int
    """The context to load it with (possibly shrunk from the profile's), for each slot."""
    budget: int
    """The memory budget in bytes it was chosen under."""
    reasons: tuple[str, ...]
    """Why this file and this context."""
    rejected: tuple[str, ...]
    """Files passed over, each with why."""
    parallel: int = 1
    """Slots: requests decoded together, each with a KV cache of ``n_ctx`` (see ``slots``)."""
    invariant: bool = True
    """Whether answers decoded together equal the same answers decoded alone (always so with one slot)."""


def slots(parallel: int, determinism: str, quantization: str, offloaded: bool) -> tuple[int, bool, str]:
    """How many slots a model gets: ``parallel``, unless answers decoded together could differ from answers decoded
    alone and ``determinism`` is ``invariant``; then one. Returns (slots, invariant, a sentence saying why)."""
    if parallel <= 1:
        return 1, True, "1 slot: one request decoded at a time"
    measured = quantization.upper() in BATCH_INVARIANT and not offloaded
    if measured:
        return parallel, True, (f"{parallel} slots: {quantization} on the CPU decodes each answer the same alone or "
                                "beside others (a KV cache per slot)")
    why = (f"{quantization} on the GPU" if offloaded and quantization.upper() in BATCH_INVARIANT
           else f"{quantization}") + " was not shown to decode answers beside others as it decodes them alone"
    if determinism == "per-request":
        return parallel, False, f"{parallel} slots: {why}, and determinism is per-request"
    return 1, True, f"1 slot, not {parallel}: {why} (determinism = \"per-request\" allows it)"


def quant_name(file_type: int | None, tensor_types: Counter[int]) -> str:
    """A quantization name from ``general.file_type``, else from the most common tensor type."""
    if file_type is not None:
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    if tensor_types:
        try:
            return gguf.GGMLQuantizationType(tensor_types.most_common(1)[0][0]).name
        except ValueError:
            pass
    return "unknown"


def inspect(path: Path) -> ModelInfo:
    """Read one GGUF file's header into a ``ModelInfo``."""
    header = read_header(path)
    md = header.metadata
    arch = str(md.get("general.architecture", ""))
    if not arch:
        raise ModelCorruptError(f"{path}: GGUF header has no general.architecture")

    def num(key: str, default: int = 0) -> int:
        value = md.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values in some architectures
            value = max(value) if value else default
        return int(value) if isinstance(value, int | float) else default

    n_head = num("attention.head_count", 1)
    types = Counter(t.ggml_type for t in header.tensors if t.name.endswith(".weight"))
    return ModelInfo(
        path=path,
        size=header.file_size,
        architecture=arch,
        name=str(md.get("general.name", path.stem)),
        parameters=sum(t.n_elements for t in header.tensors),
        quantization=quant_name(md.get("general.file_type"), types),
        context_length=num("context_length", 2048),
        n_layer=num("block_count", 1),
        n_embd=num("embedding_length", 1),
        n_head=n_head,
        n_head_kv=num("attention.head_count_kv", n_head),
        chat_template="tokenizer.chat_template" in md,
    )


def scan(directory: Path) -> tuple[list[ModelInfo], list[str]]:
    """Every readable GGUF in ``directory``, and a line for each ``*.gguf`` that could not be read."""
    if not directory.is_dir():
        raise ModelMissingError(f"{directory}: model directory does not exist")
    infos, bad = [], []
    for path in sorted(directory.glob("*.gguf")):
        try:
            infos.append(inspect(path))
        except ModelCorruptError as exc:
            bad.append(exc.message)
    return infos, bad


def choose(infos: list[ModelInfo], quant_order: tuple[str, ...], budget: int, n_ctx: int,
           min_ctx: int = 256, parallel: int = 1, determinism: str = "invariant",
           offloaded: bool = False) -> ModelChoice:
    """The first file in ``quant_order`` that fits ``budget``, shrinking ``n_ctx`` (down to ``min_ctx``) first.

    Among files of the same quantization the larger (more capable) model is tried first; quantizations not in
    the order come last, smallest first. Each file gets ``slots(parallel, ...)`` KV caches of ``n_ctx``.
    """
    if not infos:
        raise ModelMissingError("no GGUF model files to choose from")
    rank = {q.upper(): i for i, q in enumerate(quant_order)}

    def key(m: ModelInfo) -> tuple[int, int]:
        r = rank.get(m.quantization.upper())
        return (r, -m.size) if r is not None else (len(rank), m.size)

    rejected: list[str] = []
    for info in sorted(infos, key=key):
        ctx = min(n_ctx, info.context_length)
        n_slots, invariant, slots_why = slots(parallel, determinism, info.quantization, offloaded)
        while ctx >= min_ctx:
            need = info.memory_bytes(ctx, n_slots)
            if need <= budget:
                reasons = [f"{info.path.name}: {info.quantization} is "
                           + (f"#{rank[info.quantization.upper()] + 1} in the profile's order "
                              f"({', '.join(quant_order)})" if info.quantization.upper() in rank
                              else "not in the profile's order, but nothing preferred fits"),
                           f"needs {need / MIB:.0f} MiB (weights {info.size / MIB:.0f} + KV "
                           + (f"{info.kv_bytes(ctx) / MIB:.0f}" if n_slots == 1 else
                              f"{n_slots} x {info.kv_bytes(ctx) / MIB:.0f}")
                           + f" + {COMPUTE_ALLOWANCE / MIB:.0f} buffers) of a {budget / MIB:.0f} MiB budget"]
                if ctx < min(n_ctx, info.context_length):
                    reasons.append(f"n_ctx shrunk from {min(n_ctx, info.context_length)} to {ctx} to fit")
                elif ctx < n_ctx:
                    reasons.append(f"n_ctx {ctx}: the model's trained context (profile asks {n_ctx})")
                if parallel > 1:
                    reasons.append(slots_why)
                return ModelChoice(info, ctx, budget, tuple(reasons), tuple(rejected), n_slots, invariant)
            ctx //= 2
        rejected.append(f"{info.path.name} ({info.quantization}): needs "
                        f"{info.memory_bytes(min_ctx, n_slots) / MIB:.0f} MiB even at n_ctx {min_ctx}"
                        + (f" in each of {n_slots} slots" if n_slots > 1 else "")
                        + f", budget {budget / MIB:.0f} MiB")
    raise ModelTooLargeError("no model fits the memory budget: " + "; ".join(rejected))


def sha256_file(path: Path, chunk: int = 4 * MIB) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def expected_sha256(path: Path, configured: str = "") -> str:
    """The expected hash: from config, else from a ``<file>.sha256`` sidecar (``sha256sum`` format), else ``""``."""
    if configured:
        return configured.lower()
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        words = sidecar.read_text().split()
        return words[0].lower() if words else ""
    return ""


def verify(path: Path, expected: str) -> str:
    """Hash ``path``; if ``expected`` is given and differs, raise ``ModelChecksumError``. Returns the hash."""
    if not path.is_file():
        raise ModelMissingError(f"{path}: model file not found")
    actual = sha256_file(path)
    if expected and actual != expected:
        raise ModelChecksumError(f"{path}: SHA-256 is {actual}, expected {expected}")
    return actual

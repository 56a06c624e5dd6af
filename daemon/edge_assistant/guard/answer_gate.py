"""The output check as an answer streams: what of it may leave, and when.

An ``AnswerGate`` is fed the answer piece by piece, as the engine writes it, and says what may be passed on now. The
rules (role markers, blocked subjects, a stretch of the system prompt) run on all the answer so far at every piece.
Where the persona's relevance layer checks answers, each sentence is held back until it is complete and judged on
topic: an answer that drifts off topic is stopped before its first off-topic sentence leaves. Once the gate refuses,
it releases nothing more; ``refused`` says why.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..text import LIST_PIECE, STREAM_BREAK, stream_sentences
from .relevance import Relevance, content_words
from .rules import GuardConfig, Verdict, check_output

FIRST_WORDS = 12
"""Words an answer holds back before its first sentences are judged and streamed."""


class AnswerGate:
    """The output check of one answer: ``feed`` each piece as it is written, pass on what it returns, stop the
    generation once ``refused`` is set, and pass on what ``finish`` returns when the generation has ended."""

    def __init__(self, cfg: GuardConfig, system_prompt: str, relevance: Relevance | None = None,
                 passages: Sequence[str] = ()) -> None:
        """``cfg`` and ``system_prompt``: the persona's guard and the prompt no answer may repeat; ``relevance``: its
        relevance layer, which judges the answer's sentences when it ``checks_answers``; ``passages``: the texts of
        the documents the answer was given to answer from (a sentence sharing their words is on topic)."""
        self._cfg = cfg
        self._system_prompt = system_prompt
        self._relevance = relevance if relevance is not None and relevance.checks_answers else None
        self._context = content_words(" ".join(passages)) if passages else frozenset()
        self._seen: list[str] = []  # the answer so far, for the rules
        self._held = ""  # the answer's text not yet judged
        self._judged: list[str] = []  # the sentences judged on topic
        self._unsure = ""  # judged text held back: its last sentence passed only read with its neighbour
        self._waiting = 0  # sentence ends in ``_held`` when its last sentence began to wait for the one after it
        self._refused: Verdict | None = None

    @property
    def refused(self) -> Verdict | None:
        """The check that refused the answer, or None while it has not."""
        return self._refused

    def feed(self, piece: str) -> str:
        """Take the next ``piece`` of the answer; return what may be passed on now (``""``: nothing yet, or the
        answer is refused)."""
        if self._refused is not None:
            return ""
        self._seen.append(piece)
        out = check_output("".join(self._seen), self._cfg, self._system_prompt)
        if not out.allowed:
            self._refused = out
            return ""
        if self._relevance is None:
            return piece
        self._held += piece
        ends = list(STREAM_BREAK.finditer(self._held))
        # The first release waits for FIRST_WORDS words: one short line says too little about its topic. A sentence
        # the next one decides waits for it (a further sentence end).
        if not (ends and (self._judged or len(self._held[: ends[-1].end()].split()) >= FIRST_WORDS)
                and len(ends) > self._waiting):
            return ""
        cut = ends[-1].end()
        done, released = self._release(self._held[:cut])
        if done is False:
            return ""
        self._waiting = len(ends) if done is None else 0
        if done:
            self._held = self._held[cut:]
        return released

    def finish(self, cut_short: bool = False) -> str:
        """The answer has ended: judge what is held back and return what of it may be passed on (``""`` when
        nothing is left, or the answer is refused). ``cut_short``: it ended where ``max_tokens`` stopped it, and its
        last, unfinished sentence is judged with what was judged before it when it is short (a few words alone say
        little)."""
        if self._refused is not None or not (self._held or self._unsure):
            return ""
        _, released = self._release(self._held, final=True, cut_short=cut_short)
        self._held = ""
        return released

    def _release(self, text: str, final: bool = False, cut_short: bool = False) -> tuple[bool | None, str]:
        """Judge the sentences in ``text``, alone and together, and say what may be passed on: True once judged on
        topic, False once one is refused, None when its last sentence is off topic as it stands but the sentence
        after it may still let it through (``Relevance.waits``): ``text`` is judged again once that one is
        complete. Text whose last sentence passed only read with a neighbour is passed on once a sentence on topic
        by itself follows, or the answer ends (``final``): an answer that drifts off topic is stopped before its
        first doubtful sentence leaves."""
        pieces = stream_sentences(text)
        sure = True  # whether the last sentence is on topic by itself
        relevance = self._relevance
        if relevance is not None:
            sentences = list(pieces)
            if cut_short and sentences and len(sentences[-1].split()) < FIRST_WORDS:
                sentences[-1] = " ".join([*(self._judged + sentences[:-1])[-2:], sentences[-1]])
            for i, (unit, before) in enumerate(zip(sentences, read_after(self._judged, sentences), strict=True)):
                if relevance.check_answer(unit, self._context).allowed:
                    sure = True
                    continue
                after = sentences[i + 1] if i + 1 < len(sentences) else ""
                verdict = relevance.check_answer(unit, self._context, before, after)
                if not verdict.allowed:
                    if not after and not final and relevance.waits(verdict, opening=not before):
                        return None, ""
                    self._refused = verdict
                    return False, ""
                sure = False
            if len(sentences) > 1:
                verdict = relevance.check_answer(" ".join(sentences), self._context)
                if not verdict.allowed:
                    self._refused = verdict
                    return False, ""
        self._judged.extend(pieces)
        self._unsure += text
        released = ""
        if (sure or final) and self._unsure:
            released, self._unsure = self._unsure, ""
        return True, released


def read_after(before: list[str], sentences: list[str]) -> list[str]:
    """For each of ``sentences`` (``before`` came earlier in the answer), the sentence it is read after when it
    is judged with its context: the one before it, or for an item of a list the list's heading ("Weekly checks:")
    that the item continues; ``""`` for the answer's first sentence."""
    seq = [*before, *sentences]
    out = []
    for i in range(len(before), len(seq)):
        j = i - 1
        if LIST_PIECE.match(seq[i]):
            while j >= 0 and LIST_PIECE.match(seq[j]):
                j -= 1
            if j < 0 or not seq[j].rstrip().endswith(":"):
                j = i - 1
        out.append(seq[j] if j >= 0 else "")
    return out

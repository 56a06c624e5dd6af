"""The guard's sentence-embedding model: converted to GGUF at set-up, it embeds as the original model does.

``tests/data/embedding/minilm_reference.jsonl`` holds, for four texts, the token ids and the unit-length mean-pooled
embedding that the original all-MiniLM-L6-v2 (Hugging Face ``transformers``, PyTorch, F32) gives; see SOURCE.md
there. The GGUF that set-up converted must tokenize the same and embed within F16 rounding of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_assistant.bert_gguf import ConversionError, convert, phantom_space
from edge_assistant.config import load_config
from edge_assistant.engine import RECENT_EMBEDDINGS, LlamaEmbedder
from edge_assistant.guard import MARGINS, Relevance

REFERENCE = Path(__file__).parent / "data" / "embedding" / "minilm_reference.jsonl"

pytestmark = pytest.mark.model


def test_the_converted_model_embeds_as_the_original(embedding_path: Path) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(embedding_path), embedding=True, n_ctx=512, n_batch=512, n_ubatch=512,
                          n_threads=2, verbose=False)
    try:
        for line in REFERENCE.read_text(encoding="utf-8").splitlines():
            ref = json.loads(line)
            assert llm.tokenize(ref["text"].encode(), add_bos=True) == ref["ids"], ref["text"]
            vec = np.asarray(llm.embed(ref["text"], normalize=True), dtype=np.float32)
            cosine = float(vec @ np.asarray(ref["vector"], dtype=np.float32))
            assert cosine > 0.999, (ref["text"], cosine)
    finally:
        llm.close()


def test_the_embedder_knows_its_kind_and_the_guard_takes_its_margins(embedding_path: Path, model_path: Path) -> None:
    sentence = LlamaEmbedder.load(str(embedding_path), 2)
    chat = LlamaEmbedder.load(str(model_path), 2)
    try:
        assert (sentence.kind, chat.kind) == ("sentence", "llm")
        guard = load_config(None).personas["factory"].guard
        assert Relevance(guard, sentence).margins == MARGINS["sentence"]
        assert Relevance(guard, chat).margins == MARGINS["llm"]
        near = sentence.embed(["How do I change the coolant in machine 3?", "Replace the cutting fluid on the lathe.",
                               "What is the capital of France?"])
        assert near[0] @ near[1] > near[0] @ near[2]
    finally:
        sentence.close()
        chat.close()


def test_a_text_embedded_again_soon_is_not_computed_again(embedding_path: Path) -> None:
    computed: list[int] = []

    def runner(fn: Callable[[], Any]) -> Any:
        computed.append(1)
        return fn()

    embedder = LlamaEmbedder.load(str(embedding_path), 2, runner=runner)
    try:
        first = embedder.embed(["Then use a small brush to clean the filter."])
        again = embedder.embed(["Then use a small brush to clean the filter."])
        assert len(computed) == 1 and np.array_equal(first, again)
        embedder.embed([f"Step {i}: check the coolant level." for i in range(RECENT_EMBEDDINGS)])
        later = embedder.embed(["Then use a small brush to clean the filter."])  # pushed out by as many others
        assert len(computed) == 2 + RECENT_EMBEDDINGS and np.allclose(first, later, atol=1e-6)
    finally:
        embedder.close()


def test_conversion_is_reproducible_and_refuses_what_it_cannot_convert(tmp_path: Path, embedding_path: Path) -> None:
    # The converted file in the model directory was written by set-up from the pinned package's files; converting
    # a copy of a directory that is not a BERT model names the file and what is wrong, and writes nothing.
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n##lo\n")
    with pytest.raises(ConversionError, match=r"config\.json: model_type is 'llama', not 'bert'"):
        convert(src, tmp_path / "out.gguf")
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1}))
    (src / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConversionError, match=r"model\.safetensors: no tensor embeddings\.word_embeddings\.weight"):
        convert(src, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))
    assert [phantom_space(t) for t in ("[CLS]", "hello", "##lo")] == ["[CLS]", "\u2581hello", "lo"]
    assert embedding_path.with_name(embedding_path.name + ".sha256").is_file()

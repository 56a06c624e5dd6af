"""Write a sentence-transformers BERT model (safetensors, WordPiece vocabulary, mean pooling) as a GGUF file.

The guard's relevance layer embeds requests with a small sentence-embedding model (all-MiniLM-L6-v2) through
llama.cpp, like the chat model. The model is distributed as a Hugging Face directory; this turns it into the GGUF
layout llama.cpp's ``bert`` architecture reads: the same tensor names and vocabulary conventions as llama.cpp's own
converter (``convert_hf_to_gguf.py``, ``BertModel``), without its PyTorch dependency. Matrices are stored as F16,
vectors as F32. The output is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Hugging Face BERT tensor names (per layer, after ``encoder.layer.N.``) and llama.cpp's.
EMBEDDING_TENSORS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
LAYER_TENSORS = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
DTYPES = {"F32": np.float32, "F16": np.float16}


class ConversionError(ValueError):
    """The source directory is not a model this converter handles; the message names the file and what is wrong."""


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """The tensors of a ``.safetensors`` file (F32 or F16), memory-mapped."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(fh.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path}: unreadable safetensors header: {exc}") from exc
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out: dict[str, npt.NDArray[Any]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(meta.get("dtype"))
        if dtype is None:
            continue  # position ids (I64) and the like: not weights
        start, end = meta["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(meta["shape"])
    return out


def phantom_space(token: str) -> str:
    """A WordPiece token as llama.cpp's WPM vocabulary spells it: word starts carry U+2581, ``##`` pieces do not."""
    if token in SPECIAL_TOKENS:
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def convert(source: Path, dest: Path, name: str = "") -> Path:
    """Write the BERT sentence-embedding model in ``source`` (``config.json``, ``model.safetensors``,
    ``vocab.txt``, ``1_Pooling/config.json``) to ``dest`` as GGUF with mean pooling; returns ``dest``."""
    import gguf

    try:
        cfg = json.loads((source / "config.json").read_text())
        vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{source}: {exc}") from exc
    if cfg.get("model_type") != "bert":
        raise ConversionError(f"{source / 'config.json'}: model_type is {cfg.get('model_type')!r}, not 'bert'")
    pooling_file = source / "1_Pooling" / "config.json"
    if pooling_file.is_file() and not json.loads(pooling_file.read_text()).get("pooling_mode_mean_tokens"):
        raise ConversionError(f"{pooling_file}: only mean pooling is supported")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ConversionError(f"{source / 'vocab.txt'}: no {', '.join(missing)}")
    tensors = read_safetensors(source / "model.safetensors")
    names = dict(EMBEDDING_TENSORS)
    for i in range(int(cfg["num_hidden_layers"])):
        for hf, ours in LAYER_TENSORS.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{kind}"] = f"blk.{i}.{ours}.{kind}"
    absent = [hf for hf in names if hf not in tensors]
    if absent:
        raise ConversionError(f"{source / 'model.safetensors'}: no tensor {absent[0]} ({len(absent)} missing)")

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    writer = gguf.GGUFWriter(str(part), "bert")
    writer.add_name(name or source.name)
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_layer_norm_eps(float(cfg["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_token_type_count(int(cfg.get("type_vocab_size", 2)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([phantom_space(t) for t in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in vocab])
    ids = {t: i for i, t in enumerate(vocab)}
    writer.add_bos_token_id(ids["[CLS]"])
    writer.add_sep_token_id(ids["[SEP]"])
    writer.add_unk_token_id(ids["[UNK]"])
    writer.add_pad_token_id(ids["[PAD]"])
    writer.add_mask_token_id(ids["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_sep_token(True)
    for hf, ours in names.items():
        t = tensors[hf]
        # Matrices in F16; the position and token-type tables stay F32, as llama.cpp's converter leaves them.
        keep_f32 = t.ndim != 2 or ours in ("position_embd.weight", "token_types.weight")
        kept = t.astype(np.float32) if keep_f32 else t.astype(np.float16)
        writer.add_tensor(ours, np.ascontiguousarray(kept))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    part.replace(dest)
    log.info("wrote %s (%d tensors, %d tokens)", dest, len(names), len(vocab))
    return dest

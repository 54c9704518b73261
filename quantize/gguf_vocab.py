"""Our tokenizer as llama.cpp tokenizer metadata.

Two kinds are supported, picked from the files beside the model:
  tokenizer.model (sentencepiece)  -> tokenizer.ggml.model "llama" (SPM): pieces, scores, token types and
                                      unk/bos/eos/pad ids exactly as the model holds them, add_space_prefix
                                      from its add_dummy_prefix
  tokenizer.json byte-level BPE    -> tokenizer.ggml.model "gpt2" with merges and pre-tokenizer "gpt-2"
                                      (the GPT-2 split regex, which `pre_tokenizers.ByteLevel` uses)
The vocabulary is padded with unused tokens up to the model's vocab_size, since llama.cpp sizes the
embedding from the token list.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf


class VocabError(ValueError):
    """A tokenizer llama.cpp cannot be given faithfully."""


def special_ids(d: Path) -> dict[str, int]:
    meta = d / "kmoe_tokenizer.json"
    if meta.is_file():
        return {k: int(v) for k, v in json.loads(meta.read_text())["special_ids"].items() if v is not None}
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    return {k: cfg[f"{k}_token_id"] for k in ("bos", "eos", "pad") if cfg.get(f"{k}_token_id") is not None}


def add_bos(d: Path) -> bool:
    """Whether our tokenizer frames text with <s> (kmoe_tokenizer.json / tokenizer_config.json `add_bos`)."""
    for name, key in (("kmoe_tokenizer.json", "add_bos"), ("tokenizer_config.json", "add_bos_token")):
        if (d / name).is_file():
            value = json.loads((d / name).read_text()).get(key)
            if value is not None:
                return bool(value)
    return False


def add_vocab(w: gguf.GGUFWriter, d: Path, vocab_size: int, ids: dict[str, int]) -> str:
    """Write tokenizer metadata for the tokenizer in `d`; returns the llama.cpp tokenizer model name."""
    space_prefix = None
    if (d / "tokenizer.model").is_file():
        tokens, scores, types, space_prefix, sp_ids = _spm(d / "tokenizer.model")
        clash = {k: (v, sp_ids.get(k)) for k, v in ids.items() if k in sp_ids and sp_ids[k] != v}
        if clash:
            raise VocabError(f"{d}: special ids {clash} (config, tokenizer.model) disagree")
        ids = {**ids, **sp_ids}
        kind = "llama"
    elif (d / "tokenizer.json").is_file():
        tokens, types, merges = _bpe(d / "tokenizer.json")
        scores = None
        kind = "gpt2"
    else:
        raise VocabError(f"{d}: no tokenizer.model or tokenizer.json to embed in the GGUF")
    if len(tokens) > vocab_size:
        raise VocabError(
            f"{d}: tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}"
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(merges)
    else:
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for k, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                  ("unk", w.add_unk_token_id)):  # fmt: skip
        if k in ids:
            fn(ids[k])
    # llama.cpp must frame a prompt as training did: <s> first when our tokenizer adds it, never </s>.
    w.add_add_bos_token(add_bos(d))
    w.add_add_eos_token(False)
    if space_prefix is not None:
        w.add_add_space_prefix(space_prefix)
    return kind


def _spm(path: Path) -> tuple[list[str], list[float], list[int], bool, dict[str, int]]:
    """Pieces, scores and piece types exactly as the sentencepiece model holds them (sentencepiece's
    ModelProto.SentencePiece.Type numbers NORMAL..BYTE are GGUF's TokenType numbers), its add_dummy_prefix,
    and its unk/bos/eos/pad ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # 1 unigram, 2 bpe
        raise VocabError(
            f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is not unigram/BPE"
        )
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [gguf.TokenType(p.type) for p in proto.pieces]
    spec = proto.trainer_spec
    ids = {k: i for k, i in (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id),
                             ("pad", spec.pad_id)) if i >= 0}  # fmt: skip
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix), ids


def _bpe(path: Path) -> tuple[list[str], list[int], list[str]]:
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    pre = json.dumps(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise VocabError(
            f"{path}: only byte-level BPE tokenizer.json (or a sentencepiece tokenizer.model) can be embedded; "
            f"got model {model.get('type')!r}, pre_tokenizer {pre[:80]}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    n = max(vocab.values()) + 1
    if sorted(vocab.values()) != list(range(n)):
        raise VocabError(f"{path}: token ids are not contiguous 0..{n - 1}")
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    special = {t["content"] for t in tj.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges

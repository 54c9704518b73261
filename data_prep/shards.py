"""Megatron token shards: OUT/shards/<lang>.bin/.idx, one document per kept doc, framed as training sees it:
[BOS] + ids + [EOD (= eos_id)], the same BOS the exported Hugging Face tokenizer adds.

The writer needs only a tokenizer with `encode_document(text) -> list[int]`, `eos_id`, `vocab_size` and `digest`
(data_prep.tokenizer.load_tokenizer gives one). The mix step lives here because a token budget needs tokens:
documents past `mix.max_tokens[lang]` are removed with reason `over_token_budget`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import numpy as np
from datatrove.pipeline.base import PipelineStep

from data_prep.config import PiiConfig
from data_prep.records import Doc, read_jsonl_gz, write_json
from data_prep.removed import RemovedWriter
from data_prep.steps.base import StepCounts

log = logging.getLogger(__name__)


class ShardTokenizer(Protocol):
    vocab_size: int
    eos_id: int
    digest: str

    def encode_document(self, text: str) -> list[int]:
        """[BOS] + ids + [EOS]: one whole document as training reads it."""
        ...


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 65535 else np.int32


class MegatronTokenizerInfo:
    """What megatron-core's GPTDataset asks of a tokenizer (it never encodes)."""

    def __init__(self, vocab_size: int, eod: int, pad: int, digest: str):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, pad
        self.unique_identifiers = {"class": "kmoe", "digest": digest}


def kept_files(out_dir: str | Path, lang: str) -> list[Path]:
    return sorted((Path(out_dir) / "corpus" / "kept" / lang).glob("*.jsonl.gz"))


def write_language_shard(
    out_dir: str | Path,
    lang: str,
    tokenizer: ShardTokenizer,
    max_tokens: int | None,
    pii: PiiConfig | None = None,
) -> tuple[StepCounts, dict]:
    """Tokenize the kept docs of `lang` in order into OUT/shards/<lang>.bin/.idx. Returns counts and totals.
    `pii`: how removed records are redacted (the build's `pii:`; kept text was redacted already)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = Path(out_dir)
    prefix = out / "shards" / lang
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    counts = StepCounts()
    removed = RemovedWriter(
        out / "corpus" / "removed" / "mix" / f"{lang}.jsonl.gz", pii or PiiConfig(), counts
    )
    tokens, by_source = 0, defaultdict(lambda: {"docs": 0, "tokens": 0})
    try:
        for path in kept_files(out, lang):
            for rec in read_jsonl_gz(path):
                counts.n_in += 1
                ids = tokenizer.encode_document(rec["text"])
                if max_tokens is not None and tokens + len(ids) > max_tokens:
                    doc = Doc(rec["id"], rec["source"], (0, 0, 0), text=rec["text"], lang=lang)
                    removed.write(doc, "mix", "over_token_budget", False, f"budget {max_tokens}")
                    counts.removed["over_token_budget"] += 1
                    continue
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                    raise ValueError(
                        f"tokenizer produced an id outside [0, {tokenizer.vocab_size}) for {rec['id']}"
                    )
                builder.add_document(arr.astype(dtype), [arr.size])
                counts.kept += 1
                tokens += arr.size
                by_source[rec["source"]]["docs"] += 1
                by_source[rec["source"]]["tokens"] += int(arr.size)
    finally:
        removed.close()
        builder.finalize(str(prefix) + ".idx")
    totals = {"docs": counts.kept, "tokens": tokens, "dtype": np.dtype(dtype).name, "by_source": by_source}
    return counts, totals


class ShardStep(PipelineStep):
    """One task per language: task i writes languages[i]."""

    type = "kmoe"
    name = "shards"

    def __init__(
        self,
        out_dir,
        languages: list[str],
        tokenizer,
        max_tokens: dict[str, int],
        pii: PiiConfig | None = None,
    ):
        """`tokenizer`: a tokenizer directory, or a tokenizer object (in-process runs only)."""
        super().__init__()
        self.out_dir, self.languages = str(out_dir), languages
        self.tokenizer, self.max_tokens, self.pii = tokenizer, max_tokens, pii

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from data_prep.tokenizer_io import open_tokenizer

        tok = self.tokenizer
        if isinstance(tok, str | Path):
            tok = open_tokenizer(tok)
        for i, lang in enumerate(self.languages):
            if i % world_size != rank or not kept_files(self.out_dir, lang):
                continue
            counts, totals = write_language_shard(
                self.out_dir, lang, tok, self.max_tokens.get(lang), self.pii
            )
            work = Path(self.out_dir) / "work"
            write_json(work / "stats" / "mix" / f"{lang}.json", counts.to_json())
            write_json(work / "shard_totals" / f"{lang}.json", totals)
            log.info("shard %s: %d docs, %d tokens", lang, totals["docs"], totals["tokens"])
        return iter(())

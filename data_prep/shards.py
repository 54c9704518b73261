"""Megatron token shards: OUT/shards/<lang>-<part>.bin/.idx, one document per kept doc, framed as training sees
it: [BOS] + ids + [EOD (= eos_id)], the same BOS the exported Hugging Face tokenizer adds. Task `r` of the
shards stage writes part `r` of every language (data_prep/parts.py says which documents that is).

The writer needs only a tokenizer with `encode_document(text) -> list[int]`, `eos_id`, `vocab_size` and `digest`
(data_prep.tokenizer.load_tokenizer gives one). The mix step lives here because a token budget needs tokens:
documents past `mix.max_tokens[lang]` are removed with reason `over_token_budget`. The budget is taken in kept
order (a document that does not fit is removed, later smaller ones may fit), which is sequential: a language
with a budget is written as one part, by task 0.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import numpy as np
from datatrove.pipeline.base import PipelineStep

from data_prep.config import PiiConfig
from data_prep.parts import file_counts, part_name, part_range, read_range
from data_prep.records import Doc, write_json
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
    part: int = 0,
    parts: int = 1,
) -> tuple[StepCounts, dict] | None:
    """Tokenize part `part` of `parts` of the kept docs of `lang`, in kept order, into
    OUT/shards/<lang>-<part>.bin/.idx. Returns counts and totals, or None when the part holds no document.
    `pii`: how removed records are redacted (the build's `pii:`; kept text was redacted already)."""
    out = Path(out_dir)
    files = kept_files(out, lang)
    per_file = file_counts(out, lang, files)
    start, end = part_range(sum(per_file), part, parts)
    if start >= end:
        return None
    name = part_name(lang, part)
    prefix = out / "shards" / name
    prefix.parent.mkdir(parents=True, exist_ok=True)
    counts = StepCounts()
    removed = RemovedWriter(
        out / "corpus" / "removed" / "mix" / f"{name}.jsonl.gz", pii or PiiConfig(), counts
    )
    tmp = {ext: Path(f"{prefix}.{ext}.tmp") for ext in ("bin", "idx")}
    writer = _PartWriter(tokenizer, tmp["bin"], max_tokens)
    try:
        for rec in read_range(files, per_file, start, end):
            counts.n_in += 1
            reason = writer.add(rec)
            if reason:
                doc = Doc(rec["id"], rec["source"], (0, 0, 0), text=rec["text"], lang=lang)
                removed.write(doc, "mix", reason, False, f"budget {max_tokens}")
                counts.removed[reason] += 1
            else:
                counts.kept += 1
    finally:
        removed.close()
        writer.builder.finalize(str(tmp["idx"]))
    for ext, path in tmp.items():  # whole parts only under the final names (a killed task leaves .tmp files)
        path.replace(f"{prefix}.{ext}")
    totals = {
        "docs": counts.kept,
        "tokens": writer.tokens,
        "dtype": np.dtype(writer.dtype).name,
        "by_source": writer.by_source,
        "part": part,
        "prefix": f"shards/{name}",
        "first_doc": start,
    }
    return counts, totals


class _PartWriter:
    """Encodes documents into one IndexedDatasetBuilder under a token budget; counts tokens per source."""

    def __init__(self, tokenizer: ShardTokenizer, bin_path: Path, max_tokens: int | None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.builder = IndexedDatasetBuilder(str(bin_path), dtype=self.dtype)
        self.tokens = 0
        self.by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "tokens": 0})

    def add(self, rec: dict) -> str | None:
        """Append one kept record; returns the removal reason when the budget refuses it."""
        ids = self.tokenizer.encode_document(rec["text"])
        if self.max_tokens is not None and self.tokens + len(ids) > self.max_tokens:
            return "over_token_budget"
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.tokenizer.vocab_size):
            raise ValueError(
                f"tokenizer produced an id outside [0, {self.tokenizer.vocab_size}) for {rec['id']}"
            )
        self.builder.add_document(arr.astype(self.dtype), [arr.size])
        self.tokens += arr.size
        self.by_source[rec["source"]]["docs"] += 1
        self.by_source[rec["source"]]["tokens"] += int(arr.size)
        return None


class ShardStep(PipelineStep):
    """Task `rank` of `world_size` writes part `rank` of every language without a token budget; task 0 also
    writes each budgeted language whole (part 0 of 1)."""

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
        work = Path(self.out_dir) / "work"
        for lang in self.languages:
            budget = self.max_tokens.get(lang)
            part, parts = (0, 1) if budget is not None else (rank, world_size)
            if rank >= parts or not kept_files(self.out_dir, lang):
                continue
            written = write_language_shard(self.out_dir, lang, tok, budget, self.pii, part, parts)
            if written is None:
                continue
            counts, totals = written
            name = part_name(lang, part)
            write_json(work / "stats" / "mix" / f"{name}.json", counts.to_json())
            write_json(work / "shard_totals" / f"{name}.json", totals)
            log.info("shard %s: %d docs, %d tokens", name, totals["docs"], totals["tokens"])
        return iter(())

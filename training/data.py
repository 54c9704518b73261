"""Training data: megatron-core GPTDataset over the language shards, blended by the config's weights.

The train stream is one BlendedDataset; global batch `b` is samples [b*G, (b+1)*G) of it, so the data
position is a single integer (`batch_cursor`, in the checkpoint) and a resumed run reads exactly the batches
an uninterrupted run would have read. Every rank reads the whole global batch (to hash it and count its loss
tokens) and trains on its own contiguous slice. Validation uses one dataset per language on the
held-out ("valid") part of the document split.

A language written in parts (`<lang>-<part>.bin/.idx`, data_prep/parts.py) enters megatron's blend as one
prefix per part, its weight split over the parts by tokens; each entry's language is kept beside the blend,
so a sample's `dataset_id` still names its language. The stream is a function of the shard files (which the
manifest root pins) and the config, so a sample index identifies the same tokens on every rerun and replay.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.blend import build_gpt_datasets
from data_prep.parts import group_prefixes, split_weight
from data_prep.shards import MegatronTokenizerInfo
from kmoe.hashing import sha256_file, tensor_digest

from .config import RunConfig

log = logging.getLogger(__name__)
# megatron-core logs every index it builds (and that it caches nothing without path_to_cache) at INFO/WARNING.
logging.getLogger("megatron").setLevel(logging.ERROR)
# Importing megatron.core warns that TransformerEngine/Apex are missing; the dataset path needs neither.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


@dataclass
class GlobalBatch:
    index: int  # batch number in the train stream
    sample_indices: list[int]  # indices into the blended train stream
    langs: list[str]  # language of each sample
    tokens_GS: torch.Tensor  # int64 inputs
    labels_GS: torch.Tensor  # int64 next tokens
    loss_mask_GS: torch.Tensor  # float32, 1 where the label counts

    @property
    def sha256(self) -> str:
        """sha256 of the batch's token ids ([G, S+1] int32: inputs plus the last label; see docs/training.md)."""
        text = torch.cat([self.tokens_GS, self.labels_GS[:, -1:]], dim=1).to(torch.int32)
        return tensor_digest(text)


def shard_prefixes(shards: Path) -> dict[str, list[str]]:
    """Language -> its megatron path prefixes in part order, from `<shards>/shards/*.idx` or `<shards>/*.idx`
    (`<lang>-<part>` parts, or one `<lang>` shard as builds before parts wrote)."""
    for folder in (shards / "shards", shards):
        try:
            found = group_prefixes(folder)
        except ValueError as e:
            raise ValueError(f"data.shards: {e}") from None
        if found:
            return found
    raise ValueError(f"data.shards: no <lang>.bin/.idx shards under {shards} or {shards}/shards")


def part_tokens(prefixes: list[str]) -> list[int]:
    """Tokens in each shard (read from its .idx alone)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = []
    for pre in prefixes:
        ds = IndexedDataset(pre)  # keep it alive while its memory map is read
        tokens.append(int(ds.sequence_lengths.sum()))
        del ds
    return tokens


def read_special_ids(cfg: RunConfig) -> tuple[int, int, str]:
    """(eod, pad, tokenizer identity) from the tokenizer dir (data.tokenizer or <shards>/tokenizer)."""
    shards = Path(cfg.data.shards)
    tok_dir = Path(cfg.data.tokenizer) if cfg.data.tokenizer else shards / "tokenizer"
    meta = tok_dir / "kmoe_tokenizer.json"
    if not meta.is_file():
        raise ValueError(
            f"data.tokenizer: {meta} not found; set data.tokenizer to the tokenizer directory the shards "
            "were encoded with (it holds kmoe_tokenizer.json with the EOD id)"
        )
    info = json.loads(meta.read_text())
    ids = info.get("special_ids", {})
    if "eos" not in ids:
        raise ValueError(f"{meta}: special_ids.eos (the EOD token of the shards) is missing")
    return int(ids["eos"]), int(ids.get("pad", -1)), str(info.get("digest", sha256_file(meta)))


def manifest_info(shards: Path) -> dict[str, Any]:
    """Root hash and file digest of the shard manifest (the ledger records them)."""
    path = shards / "manifest.json"
    if not path.is_file():
        raise ValueError(f"data.shards: {path} not found (the output of `kmoe data build` has one)")
    manifest = json.loads(path.read_text())
    return {
        "manifest": str(path),
        "manifest_sha256": sha256_file(path),
        "root_hash": manifest.get("root_hash"),
    }


def blend_weights(cfg: RunConfig, prefixes: dict[str, list[str]]) -> dict[str, float]:
    """Config blend (language -> weight), or token shares when the blend is empty; sorted by language."""
    if not cfg.data.blend:
        return {lang: float(sum(part_tokens(pres))) for lang, pres in sorted(prefixes.items())}
    unknown = sorted(set(cfg.data.blend) - set(prefixes))
    if unknown:
        raise ValueError(
            f"data.blend.{unknown[0]}: no shard for this language under {cfg.data.shards} "
            f"(found: {', '.join(sorted(prefixes))})"
        )
    weights = {lang: w for lang, w in sorted(cfg.data.blend.items()) if w > 0}
    if not weights:
        raise ValueError("data.blend: every weight is 0")
    return weights


def part_blend(
    prefixes: dict[str, list[str]], weights: dict[str, float]
) -> tuple[list[str], list[float], list[str]]:
    """megatron's blend over every part (a language's weight split by tokens) and the language of each entry,
    so a sample's `dataset_id` names its language."""
    flat, flat_w, langs = [], [], []
    for lang, w in weights.items():
        pres = prefixes[lang]
        flat += pres
        flat_w += split_weight(w, part_tokens(pres)) if len(pres) > 1 else [w]
        langs += [lang] * len(pres)
    return flat, flat_w, langs


def check_sources(
    cfg: RunConfig,
) -> tuple[dict[str, list[str]], dict[str, float], tuple[int, int, str], dict[str, Any]]:
    """(shard prefixes, blend weights, tokenizer special ids, manifest info) of `data.*`, without building an
    index; a ValueError names the key. `kmoe launch` runs it before submitting a job."""
    shards = Path(cfg.data.shards)
    if not cfg.data.shards or not shards.is_dir():
        raise ValueError(f"data.shards: {cfg.data.shards!r} is not a directory")
    prefixes = shard_prefixes(shards)
    return prefixes, blend_weights(cfg, prefixes), read_special_ids(cfg), manifest_info(shards)


def _build(cfg, tokenizer, blend, sizes: list[int]) -> list:
    return build_gpt_datasets(blend, tokenizer, cfg.data.seq_len, sizes, cfg.train.seed, cfg.data.split)


def samples_needed(cfg: RunConfig) -> int:
    """Train samples to index: every step's batch plus headroom for batches skipped by spike rollbacks."""
    g = cfg.train.global_batch_size
    return (cfg.train.steps + max(8, cfg.train.steps // 10)) * g


class TrainData:
    """The blended train stream and the per-language validation sets of one run."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.prefixes, self.weights, (eod, pad, tok_id), self.manifest = check_sources(cfg)
        self.langs = list(self.weights)
        self.tokenizer = MegatronTokenizerInfo(cfg.model.vocab_size, eod, pad, tok_id)
        flat, flat_w, self.dataset_langs = part_blend(self.prefixes, self.weights)
        self.train = _build(cfg, self.tokenizer, (flat, flat_w), [samples_needed(cfg), 0, 0])[0]
        if self.train is None:
            raise ValueError(f"data.split: {cfg.data.split!r} leaves no training documents")
        self.num_batches = len(self.train) // cfg.train.global_batch_size
        self._valid: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        total = sum(self.weights.values())
        return {
            "shards": self.cfg.data.shards,
            "languages": {lang: self.weights[lang] / total for lang in self.langs},
            "prefixes": {lang: self.prefixes[lang] for lang in self.langs},
            "seq_len": self.cfg.data.seq_len,
            "split": self.cfg.data.split,
            "seed": self.cfg.train.seed,
            "tokenizer": self.tokenizer.unique_identifiers["digest"],
            **self.manifest,
        }

    def global_batch(self, index: int) -> GlobalBatch:
        g = self.cfg.train.global_batch_size
        if index >= self.num_batches:
            raise ValueError(
                f"data: batch {index} is past the {self.num_batches} batches indexed for train.steps "
                f"{self.cfg.train.steps} (too many batches skipped?)"
            )
        return self.batch_of(index, list(range(index * g, (index + 1) * g)))

    def batch_of(self, index: int, idx: list[int]) -> GlobalBatch:
        """Batch number `index` made of train-stream samples `idx` (replay re-reads recorded ones by this)."""
        bad = [i for i in idx if not 0 <= i < len(self.train)]
        if bad:
            raise ValueError(f"data: sample {bad[0]} is outside the {len(self.train)} indexed train samples")
        items = [self.train[i] for i in idx]
        langs = [self.dataset_langs[int(it.get("dataset_id", 0))] for it in items]
        batch = GlobalBatch(
            index=index,
            sample_indices=idx,
            langs=langs,
            tokens_GS=torch.stack([it["tokens"] for it in items]).long(),
            labels_GS=torch.stack([it["labels"] for it in items]).long(),
            loss_mask_GS=torch.stack([it["loss_mask"] for it in items]).float(),
        )
        check_vocab(batch, self.cfg.model.vocab_size)
        return batch

    def valid_sets(self) -> dict[str, Any]:
        """One GPTDataset per language over its held-out documents (built on first use)."""
        if self._valid is None:
            n = self.cfg.train.eval_batches * self.cfg.train.micro_batch_size
            self._valid = {}
            for lang in self.langs:
                pres = self.prefixes[lang]
                blend = (pres, split_weight(1.0, part_tokens(pres)) if len(pres) > 1 else None)
                ds = _build(self.cfg, self.tokenizer, blend, [0, n, 0])[1]
                if ds is None:
                    log.warning(
                        "data.split %s leaves no validation documents for %s", self.cfg.data.split, lang
                    )
                    continue
                self._valid[lang] = ds
        return self._valid


def check_vocab(batch: GlobalBatch, vocab_size: int) -> None:
    top = int(max(batch.tokens_GS.max(), batch.labels_GS.max()))
    if top >= vocab_size:
        row = int(
            (batch.tokens_GS.max(1).values.maximum(batch.labels_GS.max(1).values) >= vocab_size).nonzero()[0]
        )
        raise ValueError(
            f"data: token id {top} in sample {batch.sample_indices[row]} ({batch.langs[row]}) is >= "
            f"model.vocab_size {vocab_size}; the shards were encoded with a larger vocabulary"
        )


def valid_samples(ds: Any, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(min(n, len(ds)))]
    return (
        torch.stack([it["tokens"] for it in items]).long(),
        torch.stack([it["labels"] for it in items]).long(),
        torch.stack([it["loss_mask"] for it in items]).float(),
    )


def rank_slice(batch: GlobalBatch, rank: int, world: int) -> slice:
    """This rank's contiguous share of the global batch."""
    per = len(batch.sample_indices) // world
    return slice(rank * per, (rank + 1) * per)


def lang_counts(langs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for lang in langs:
        out[lang] = out.get(lang, 0) + 1
    return out

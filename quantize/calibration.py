"""Calibration and evaluation text: read it, mix languages, tokenize, and count the tokens each expert is routed.

Inputs (one or more paths):
  *.jsonl / *.jsonl.gz   one {"text": ..., "lang": ...} per line (the corpus' kept-doc format)
  *.txt                  one document per non-empty line; language from the file stem (ko.txt) or "unk"
  a shards directory     megatron `<lang>-<part>.bin/.idx` parts (read in part order as one shard per language)
                         or `<lang>.bin/.idx` pairs (+ manifest.json): documents are read from the TAIL
                         of each language shard, the part megatron's default split (969,30,1) holds out;
                         eval reads the last min(EVAL_DOCS, n/2) documents of a shard of n, calibration
                         the documents before those, so the two never share a document
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.parts import group_prefixes
from kmoe.hashing import sha256_file, sha256_json

log = logging.getLogger(__name__)
LANGS = ("ko", "en", "ja", "code")
EVAL_DOCS = 256  # per language shard


class CalibrationError(ValueError):
    """Calibration input that is missing, malformed or leaves experts without tokens."""


@dataclass
class Docs:
    """Documents per language, as text or (for shards) token ids, with digests of the files they came from."""

    text: dict[str, list[str]] = field(default_factory=dict)
    ids: dict[str, list[list[int]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256

    def langs(self) -> list[str]:
        return sorted(set(self.text) | set(self.ids))


def parse_mix(spec: str | None) -> dict[str, float] | None:
    """'ko=0.5,en=0.2,ja=0.2,code=0.1' -> weights; None keeps every language with equal weight."""
    if not spec:
        return None
    mix = {}
    for part in spec.split(","):
        lang, _, w = part.partition("=")
        try:
            mix[lang.strip()] = float(w)
        except ValueError:
            raise CalibrationError(f"--mix {spec!r}: {part!r} is not LANG=WEIGHT") from None
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise CalibrationError(f"--mix {spec!r}: weights must be >= 0 and not all zero")
    return mix


def read_docs(paths: Iterable[str | Path], shard_docs: int = EVAL_DOCS, part: str = "eval") -> Docs:
    """Documents from every path; from shards, up to `shard_docs` per language of the eval or calib part."""
    if part not in ("eval", "calib"):
        raise ValueError(f"part {part!r} is not 'eval' or 'calib'")
    docs = Docs()
    for p in map(Path, paths):
        if p.is_dir():
            _read_shards(p, docs, shard_docs, part)
        elif p.suffix == ".txt":
            _read_txt(p, docs)
        elif p.name.endswith((".jsonl", ".jsonl.gz")):
            _read_jsonl(p, docs)
        else:
            raise CalibrationError(f"{p}: not a .txt, .jsonl(.gz) file or a shards directory")
    if not docs.text and not docs.ids:
        raise CalibrationError(f"no documents in {[str(p) for p in paths]}")
    return docs


def _read_txt(p: Path, docs: Docs) -> None:
    lang = p.stem if p.stem in LANGS else "unk"
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    docs.text.setdefault(lang, []).extend(lines)
    docs.files[str(p)] = sha256_file(p)


def _read_jsonl(p: Path, docs: Docs) -> None:
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CalibrationError(f"{p}:{n}: expected a JSON object with a 'text' key ({e})") from None
            docs.text.setdefault(str(row.get("lang", "unk")), []).append(text)
    docs.files[str(p)] = sha256_file(p)


def _read_shards(d: Path, docs: Docs, per_lang: int, part: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        found = group_prefixes(d)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    if not found:
        raise CalibrationError(f"{d}: no <lang>.bin/.idx shards")
    for lang, prefixes in found.items():
        parts = [IndexedDataset(pre) for pre in prefixes]  # a language's parts, read as one in part order
        starts = list(itertools.accumulate((len(ds) for ds in parts), initial=0))
        n = starts[-1]
        if n < 2:
            raise CalibrationError(
                f"{prefixes[0]}: {n} document(s); need 2 or more to keep eval and calibration apart"
            )
        held = min(EVAL_DOCS, n // 2)
        end = n if part == "eval" else n - held
        tail = range(max(0, end - min(per_lang, held if part == "eval" else per_lang)), end)
        at = [bisect.bisect_right(starts, j) - 1 for j in tail]
        docs.ids.setdefault(lang, []).extend(
            [parts[k][j - starts[k]].astype("int64").tolist() for k, j in zip(at, tail)]
        )
        for pre in prefixes:
            for ext in (".idx", ".bin"):
                docs.files[pre + ext] = sha256_file(pre + ext)
    if (d / "manifest.json").is_file():
        docs.files[str(d / "manifest.json")] = sha256_file(d / "manifest.json")


def token_sequences(
    docs: Docs, tokenizer, seq_len: int, num_samples: int, mix: dict[str, float] | None = None
) -> dict[str, list[list[int]]]:
    """Per language, up to its share of `num_samples` sequences of at most `seq_len` tokens (docs joined by EOS)."""
    langs = [lg for lg in docs.langs() if mix is None or mix.get(lg, 0) > 0]
    if mix:
        missing = sorted(set(k for k, w in mix.items() if w > 0) - set(docs.langs()))
        if missing:
            raise CalibrationError(f"--mix names {missing} but the input has only {docs.langs()}")
    if not langs:
        raise CalibrationError(f"no language of {docs.langs()} has a positive weight in the mix {mix}")
    weights = {lg: (mix[lg] if mix else 1.0) for lg in langs}
    total = sum(weights.values())
    eos = tokenizer.eos_token_id
    out = {}
    for lg in langs:
        stream: list[int] = []
        for t in docs.text.get(lg, []):
            stream += tokenizer(t)["input_ids"] + ([eos] if eos is not None else [])
        for ids in docs.ids.get(lg, []):
            stream += ids
        want = max(1, round(num_samples * weights[lg] / total))
        out[lg] = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)][:want]
        out[lg] = [s for s in out[lg] if len(s) > 1]
    return out


def docs_record(docs: Docs, seqs: dict[str, list[list[int]]], mix: dict[str, float] | None) -> dict:
    """What quantization.json records about calibration data: file digests, mix, token counts."""
    return {
        "files": docs.files,
        "mix": mix,
        "sequences": {lg: len(s) for lg, s in seqs.items()},
        "tokens": {lg: sum(map(len, s)) for lg, s in seqs.items()},
        "token_digest": sha256_json(seqs),
    }


@torch.no_grad()
def count_expert_tokens(model, sequences: Iterable[list[int]]) -> dict[str, list[int]]:
    """Tokens routed to each expert of every MoE layer of an HF Glm4Moe model: {"layers.i": [count per expert]}."""
    counts: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopkRouter"):
            key = name.removeprefix("model.").removesuffix(".mlp.gate")
            counts[key] = torch.zeros(mod.num_experts, dtype=torch.long)

            def hook(_m, _inp, out, key=key):
                counts[key] += torch.bincount(out[2].flatten(), minlength=len(counts[key]))

            hooks.append(mod.register_forward_hook(hook))
    if not counts:
        raise CalibrationError("the model has no MoE router (Glm4MoeTopkRouter); is it a Glm4Moe model?")
    try:
        for seq in sequences:
            model(torch.tensor([seq]))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.tolist() for k, v in counts.items()}


def starved_experts(counts: dict[str, list[int]], min_tokens: int = 1) -> list[str]:
    """Names like 'layers.2 expert 5' of experts routed fewer than `min_tokens` calibration tokens."""
    return [f"{k} expert {e}" for k, c in counts.items() for e, n in enumerate(c) if n < min_tokens]

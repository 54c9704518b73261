"""Token shards in parts: how a language's kept documents are split over the shards stage's tasks, how the
parts are named, and how a reader groups them back into languages.

Part `p` of `T` holds the language's kept documents [p*N//T, (p+1)*N//T) in kept order (N documents over the
kept files in sorted order), so concatenating the parts in part order gives the one-part shard, and the token
multiset of a language does not depend on T. A part with no documents is not written. Files:
`shards/<lang>-<part:05d>.bin/.idx`; builds made before parts wrote `shards/<lang>.bin/.idx` (one part), which
readers still accept. A `-` separates the part number because megatron prefixes are joined to ".bin" as
strings while `Path.with_suffix` would eat a dotted part number.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.records import read_jsonl_gz

PART_RE = re.compile(r"^(?P<lang>[a-z]+)(?:-(?P<part>\d{5}))?$")


def part_name(lang: str, part: int) -> str:
    return f"{lang}-{part:05d}"


def part_range(n_docs: int, part: int, parts: int) -> tuple[int, int]:
    """Document range [start, end) of `part` of `parts` (contiguous, balanced, independent of who runs it)."""
    return part * n_docs // parts, (part + 1) * n_docs // parts


def count_lines(path: Path) -> int:
    """Records in one kept .jsonl.gz (one JSON object a line), without parsing them."""
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def file_counts(out_dir: Path, lang: str, files: list[Path]) -> list[int]:
    """Records per kept file: from `work/kept_index/<lang>/<task>.json` ({file name: records}, written by each
    dedup task beside its kept files) when they cover every file, else counted (each shards task then
    decompresses the language once)."""
    index: dict[str, int] = {}
    for part in sorted((Path(out_dir) / "work" / "kept_index" / lang).glob("*.json")):
        index.update(json.loads(part.read_text()))
    if all(f.name in index for f in files):
        return [int(index[f.name]) for f in files]
    return [count_lines(f) for f in files]


def read_range(files: list[Path], counts: list[int], start: int, end: int) -> Iterator[dict]:
    """Records [start, end) of the concatenation of `files` (`counts`: records per file); files outside the
    range are not read."""
    offset = 0
    for path, n in zip(files, counts, strict=True):
        if offset >= end:
            return
        if offset + n > start:
            for i, rec in enumerate(read_jsonl_gz(path), offset):
                if i >= end:
                    return
                if i >= start:
                    yield rec
        offset += n


def group_prefixes(folder: Path) -> dict[str, list[str]]:
    """Language -> its megatron prefixes in part order, from `<folder>/*.idx` (parts or one-part shards).

    Raises:
        ValueError: a .bin is missing beside its .idx, or a language has both a one-part shard and parts.
    """
    found: dict[str, list[tuple[int, str]]] = {}
    for idx in sorted(folder.glob("*.idx")):
        m = PART_RE.match(idx.stem)
        if m is None:
            continue
        prefix = str(idx.with_suffix(""))
        if not Path(prefix + ".bin").is_file():
            raise ValueError(f"{folder}/{idx.stem}.bin missing beside its .idx")
        part = -1 if m["part"] is None else int(m["part"])
        found.setdefault(m["lang"], []).append((part, prefix))
    for lang, parts in found.items():
        if len(parts) > 1 and any(p < 0 for p, _ in parts):
            raise ValueError(f"{folder}: both {lang}.idx and {lang}-NNNNN.idx parts; remove the stale one")
    return {lang: [pre for _, pre in sorted(parts)] for lang, parts in sorted(found.items())}


def split_weight(weight: float, tokens: list[int]) -> list[float]:
    """A language's blend weight split over its parts in proportion to their tokens, so the parts of a
    language are drawn as often, token for token, as the one-part shard would be."""
    total = sum(tokens)
    if total <= 0:
        return [weight / len(tokens)] * len(tokens)
    return [weight * t / total for t in tokens]


def language_totals(part_totals: dict[str, dict]) -> dict[str, dict]:
    """Per-language totals (docs, tokens, dtype, by_source, parts in part order) from the per-part ones
    (`work/shard_totals/<lang>-<part>.json`, keyed by file stem; a pre-parts `<lang>.json` is one part)."""
    langs: dict[str, dict] = {}
    for stem, t in sorted(part_totals.items(), key=lambda kv: (kv[0].split("-")[0], kv[1].get("part", 0))):
        lang = stem.split("-")[0]
        d = langs.setdefault(
            lang, {"docs": 0, "tokens": 0, "dtype": t["dtype"], "by_source": {}, "parts": []}
        )
        d["docs"] += t["docs"]
        d["tokens"] += t["tokens"]
        for src, c in t["by_source"].items():
            s = d["by_source"].setdefault(src, {"docs": 0, "tokens": 0})
            s["docs"] += c["docs"]
            s["tokens"] += c["tokens"]
        d["parts"].append(
            {"prefix": t.get("prefix", f"shards/{lang}"), "docs": t["docs"], "tokens": t["tokens"]}
        )
    return langs

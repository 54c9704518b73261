"""manifest.json: sha256 of every output file, counts per language and source, tokenizer and config hashes,
the language blend for training, and one `root_hash` over all of it (training records that root).

root_hash = named_merkle_root({"file:<relpath>": sha256, ..., "counts": sha256_json(counts),
"tokenizer": digest, "config": config_hash, "blend": sha256_json(blend)}) from kmoe.hashing, so an auditor
can recompute it with that file alone.

`counts[lang]["parts"]` lists the language's token shard parts in part order (prefix, docs, tokens, sha256 of
the .bin and .idx); `blend` is megatron's form, one prefix per part, a language's weight split over its parts
by tokens (data_prep/parts.py). Manifests written before parts (version 1) have one `shards/<lang>` per
language and no `parts`.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.parts import split_weight
from kmoe.hashing import named_merkle_root, sha256_file, sha256_json

HASHED_DIRS = ("corpus", "shards", "tokenizer")  # work/ (task logs, markers) is not an output
MANIFEST_VERSION = 2


def output_files(out_dir: Path) -> list[Path]:
    files = [out_dir / "stats.json"]
    for d in HASHED_DIRS:
        files += sorted(p for p in (out_dir / d).rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    return files


def blend_weights(weights: dict[str, float], langs: list[str]) -> dict[str, float]:
    """Normalised blend over the languages that have shards."""
    w = {lang: float(weights.get(lang, 0.0)) for lang in langs}
    total = sum(w.values())
    if total <= 0:
        return {lang: 1.0 / len(langs) for lang in langs} if langs else {}
    return {lang: v / total for lang, v in w.items() if v > 0}


def build_manifest(
    out_dir: Path, shard_totals: dict, tokenizer_info: dict, config_hash: str, weights
) -> dict:
    """`shard_totals`: per language (data_prep.parts.language_totals; without `parts`, one `shards/<lang>`)."""
    out_dir = Path(out_dir)
    files = {str(p.relative_to(out_dir)): sha256_file(p) for p in output_files(out_dir)}
    langs = sorted(shard_totals)
    counts = {
        lang: {
            "docs": t["docs"],
            "tokens": t["tokens"],
            "dtype": t["dtype"],
            "by_source": t["by_source"],
            "parts": [
                {**p, "sha256": {ext: files.get(f"{p['prefix']}.{ext}") for ext in ("bin", "idx")}}
                for p in _parts(lang, t)
            ],
        }
        for lang, t in sorted(shard_totals.items())
    }
    all_tokens = sum(t["tokens"] for t in shard_totals.values()) or 1
    blend = blend_weights(weights, langs)
    mix = {
        lang: {
            "natural_share": round(shard_totals[lang]["tokens"] / all_tokens, 6),
            "weight": round(blend.get(lang, 0.0), 6),
            "upsample": round(
                blend.get(lang, 0.0) / max(shard_totals[lang]["tokens"] / all_tokens, 1e-12), 4
            ),
        }
        for lang in langs
    }
    prefixes, part_weights = [], []
    for lang, w in blend.items():
        parts = counts[lang]["parts"]
        prefixes += [p["prefix"] for p in parts]
        part_weights += split_weight(w, [p["tokens"] for p in parts])
    leaves = {f"file:{k}": v for k, v in files.items()}
    leaves.update(
        counts=sha256_json(counts),
        tokenizer=tokenizer_info["digest"],
        config=config_hash,
        blend=sha256_json(blend),
    )
    return {
        "version": MANIFEST_VERSION,
        "files": files,
        "counts": counts,
        "mix": mix,
        "blend": {"prefixes": prefixes, "weights": part_weights},
        "tokenizer": tokenizer_info,
        "config_hash": config_hash,
        "root_hash": named_merkle_root(leaves),
    }


def _parts(lang: str, totals: dict) -> list[dict]:
    if "parts" in totals:
        return totals["parts"]
    return [{"prefix": f"shards/{lang}", "docs": totals["docs"], "tokens": totals["tokens"]}]


def verify_manifest(out_dir: Path, manifest: dict) -> list[str]:
    """Files whose sha256 no longer matches (empty list = intact)."""
    bad = []
    for rel, digest in manifest["files"].items():
        p = Path(out_dir) / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad

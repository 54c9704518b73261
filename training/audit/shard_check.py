"""`kmoe audit verify` on a sharded checkpoint's files, without loading the model.

One read of each shard file does everything: its sha256 (against the ledger's `files`), its header (the
blocks it holds, against the manifest's chunk map: a file copied over another holds the wrong blocks) and
the layout-independent digest pieces of every block (kmoe.hashing.raw_box_pieces on the bytes as stored).
The pieces of all files combine into one digest per tensor, compared with the manifest: a flipped byte names
the tensor, a deleted or truncated file names the file and the tensor elements nobody holds any more. The
recomputed model digests must also give the model root the ledger records, so the record is tied to the
bytes on disk, not only to the manifest beside them. Memory: one block's pieces at a time (files are
memory-mapped).
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from kmoe.hashing import DigestError, Pieces, TensorMeta, combine_pieces, named_merkle_root, raw_box_pieces
from kmoe.safetensors_stream import SafetensorsError, read_header


def _file_pieces(path: Path, part: str, tensors: dict[str, Any], findings: list[str], rel: str,
                 expected: dict[str, Any] | None) -> tuple[str, dict[str, Pieces]]:  # fmt: skip
    """(sha256 of the file, pieces by DCP key); header problems become findings naming the file."""
    sha = hashlib.sha256()
    out: dict[str, Pieces] = {}
    if path.stat().st_size == 0:
        findings.append(f"{rel} is empty")
        return sha.hexdigest(), out
    with open(path, "rb") as f:  # the map outlives the file object; it goes when the last view does
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    sha.update(mm)
    try:
        header, start = read_header(path)
    except SafetensorsError as e:
        findings.append(str(e))
        return sha.hexdigest(), out
    extra = header.pop("__metadata__", {}) or {}
    offsets = json.loads(extra.get("DCP_SHARDING_INFO", "{}"))
    held = {
        n: {"offsets": offsets.get(n, {}).get("saved_offsets"), "sizes": h["shape"]}
        for n, h in header.items()
    }
    if expected is not None and held != expected:
        findings.append(f"{rel} holds blocks {_blocks(held)}, the manifest records {_blocks(expected)} "
                        "(a shard file replaced by another?)")  # fmt: skip
    for name, h in header.items():
        t = tensors.get(name)
        if t is None:
            findings.append(f"{rel} holds tensor '{name}', which the manifest does not list")
            continue
        a, b = h["data_offsets"]
        raw = np.frombuffer(mm, dtype=np.uint8, count=b - a, offset=start + a)
        try:
            out[f"{part}/{name}"] = raw_box_pieces(
                TensorMeta(t["dtype"], tuple(t["shape"])), held[name]["offsets"] or [], h["shape"], raw
            )
        except DigestError as e:
            findings.append(f"{rel}: tensor '{name}': {e}")
    return sha.hexdigest(), out


def _blocks(held: dict[str, Any]) -> str:
    items = sorted(held.items())
    shown = ", ".join(f"{n}@{v['offsets']}" for n, v in items[:3])
    return shown + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def check_sharded(path: Path, rel: str, manifest: dict[str, Any], recorded_files: dict[str, str],
                  model_root: str | None) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """(findings, sha256 of every shard file found on disk) for one format-2 checkpoint directory."""
    findings: list[str] = []
    hashes: dict[str, str] = {}
    pieces: dict[str, list[Pieces]] = {}
    for part, tensors in sorted(manifest.get("tensors", {}).items()):
        if part not in ("model", "optimizer"):
            continue
        for f in sorted((path / part).glob("*.safetensors")):
            frel = f.relative_to(path).as_posix()
            sha, got = _file_pieces(f, part, tensors, findings, f"{rel}/{frel}", manifest["shards"].get(frel))
            hashes[frel] = sha
            for key, p in got.items():
                pieces.setdefault(key, []).append(p)
    for part, tensors in sorted(manifest.get("tensors", {}).items()):
        for name, t in sorted(tensors.items()):
            key = f"{part}/{name}"
            try:
                got = combine_pieces(pieces.get(key) or [Pieces(TensorMeta(t["dtype"], tuple(t["shape"])))])
            except DigestError as e:
                findings.append(f"{rel}: tensor '{name}' ({part}): {e}")
                continue
            if got != t["digest"]:
                findings.append(
                    f"{rel}: tensor '{name}' ({part}) in the shard files does not match its recorded digest"
                )
    model = {n: t["digest"] for n, t in manifest["tensors"].get("model", {}).items()}
    if model_root is not None and named_merkle_root(model) != model_root:
        findings.append(f"{rel}/checkpoint.json: the model digests do not give the recorded model root")
    return findings, hashes

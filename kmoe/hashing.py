"""One hashing utility for every record kmoe writes: canonical JSON, file and tensor digests, Merkle roots.

The data manifest, checkpoints, the training ledger and artifact manifests all use these functions, so a
digest computed by one stage can be checked by any other (and by an auditor with only this file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON encoding: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(t: Any) -> str:
    """sha256 over dtype, shape and the raw little-endian bytes of a tensor (torch or numpy)."""
    if hasattr(t, "detach"):  # torch tensor; bf16 has no numpy dtype, so hash its raw bits
        import torch

        t = t.detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = list(t.shape)
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # 0-dim too
    else:
        arr = np.ascontiguousarray(t)
        dtype, shape, raw = str(arr.dtype), list(arr.shape), arr.tobytes()
    h = hashlib.sha256()
    h.update(canonical_json({"dtype": dtype, "shape": shape}))
    h.update(raw)
    return h.hexdigest()


def state_digests(state: Mapping[str, Any]) -> dict[str, str]:
    """Per-tensor digests of a state dict, keyed by name."""
    return {name: tensor_digest(t) for name, t in sorted(state.items())}


def merkle_root(leaves: Iterable[str]) -> str:
    """Merkle root over hex digests, in the given order; odd nodes are promoted. Empty input hashes b''."""
    level = [bytes.fromhex(x) for x in leaves]
    if not level:
        return sha256_bytes(b"")
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return hashlib.sha256(b"\x00" + level[0]).hexdigest()


def named_merkle_root(digests: Mapping[str, str]) -> str:
    """Merkle root over name-bound leaves, so renaming a tensor changes the root as well as changing it."""
    return merkle_root(sha256_bytes(f"{k}\x00{v}".encode()) for k, v in sorted(digests.items()))

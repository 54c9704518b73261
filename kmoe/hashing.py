"""One hashing utility for every record kmoe writes: canonical JSON, file and tensor digests, Merkle roots.

The data manifest, checkpoints, the training ledger and artifact manifests all use these functions, so a
digest computed by one stage can be checked by any other (and by an auditor with only this file).

Two per-tensor digest schemes exist; records name the one they use (`scheme`, `digest_scheme`):
- `TENSOR_SCHEME` (kmoe-merkle/1, below): a Merkle tree over fixed-size pieces of the tensor's lines, the
  same value whatever layout held the tensor, computed by each rank over the part it owns and combined from
  hashes. Weights, optimizer state and checkpoints use it (spec and rationale: docs/ledger.md).
- `LEGACY_SCHEME` (sha256-full/1, `tensor_digest`): sha256 over the whole tensor's bytes. Ledgers written
  before the Merkle scheme record it; batch hashes (small host tensors every rank holds whole) still use it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20
LEGACY_SCHEME = "sha256-full/1"


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


def tensor_raw(t: Any) -> tuple[str, list[int], np.ndarray]:
    """(dtype name, shape, the elements' little-endian bytes as a flat uint8 array) of a torch/numpy tensor."""
    if hasattr(t, "detach"):  # torch tensor; bf16 has no numpy dtype, so read its raw bits
        import torch

        t = t.detach().to("cpu").contiguous()
        dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)  # 0-d safe
    else:
        arr = np.asarray(t)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        dtype, shape, raw = str(arr.dtype), list(arr.shape), arr.reshape(-1).view(np.uint8)
    return dtype, shape, raw


def tensor_digest(t: Any) -> str:
    """LEGACY_SCHEME: sha256 over dtype, shape and the raw little-endian bytes of a whole tensor."""
    # numpy input goes through ascontiguousarray, as it always has: a 0-d array hashes with shape [1]
    dtype, shape, raw = tensor_raw(t if hasattr(t, "detach") else np.ascontiguousarray(t))
    h = hashlib.sha256()
    h.update(canonical_json({"dtype": dtype, "shape": shape}))
    h.update(raw)
    return h.hexdigest()


def digest_as(t: Any, scheme: str) -> str:
    """The digest of a whole tensor under `scheme` (TENSOR_SCHEME or LEGACY_SCHEME)."""
    if scheme == TENSOR_SCHEME:
        return layout_digest(t)
    if scheme == LEGACY_SCHEME:
        return tensor_digest(t)
    raise ValueError(f"unknown tensor digest scheme {scheme!r} (known: {TENSOR_SCHEME}, {LEGACY_SCHEME})")


def state_digests(state: Mapping[str, Any], scheme: str | None = None) -> dict[str, str]:
    """Per-tensor digests of a state dict of whole tensors, keyed by name (default: TENSOR_SCHEME)."""
    return {name: digest_as(t, scheme or TENSOR_SCHEME) for name, t in sorted(state.items())}


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


# ---------------------------------------------------------------- the layout-independent tensor digest
#
# TENSOR_SCHEME, for a tensor of dtype d and shape (n_0, ..., n_k-1):
#   lines   the tensor as prod(n_0..n_k-2) lines of L = n_k-1 elements (a 0-d tensor: one line of 1 element)
#   leaves  each line cut into ceil(L / LEAF_ELEMS) pieces of LEAF_ELEMS elements (the last one shorter),
#           numbered row-major: leaf (line i, piece j) = i * ceil(L / LEAF_ELEMS) + j
#   leaf    sha256(0x00 || the piece's little-endian bytes)
#   node    sha256(0x01 || left || right), RFC 6962 shape: the left child holds the largest power of two of
#           leaves strictly below the node's count
#   digest  sha256(0x02 || canonical_json({dtype, leaf_elems, scheme, shape}) || root), root of no leaves
#           being sha256(b"")
# A shard split along any dim but the last holds whole lines, hence whole leaves: it hashes them, folds each
# run of consecutive leaves into the tree nodes the run covers, and sends only those 32-byte nodes. Only a
# split inside a line at a point that is not a multiple of LEAF_ELEMS (a 1-D tensor split over many ranks,
# a flat ZeRO-style range) cuts a leaf; that leaf's < LEAF_ELEMS elements on each side travel as fragments.

TENSOR_SCHEME = "kmoe-merkle/1"
LEAF_ELEMS = 1024
_LEAF = hashlib.sha256(b"\x00")
_EMPTY_ROOT = hashlib.sha256(b"").digest()


class DigestError(ValueError):
    """Shard pieces that do not make up one whole tensor (a leaf missing, pieces that disagree)."""


@dataclass(frozen=True)
class TensorMeta:
    """What a digest binds besides the elements: dtype name (torch's, e.g. "bfloat16") and global shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def line_len(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def lines(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1

    @property
    def leaves_per_line(self) -> int:
        return -(-self.line_len // LEAF_ELEMS)

    @property
    def leaves(self) -> int:
        return self.lines * self.leaves_per_line

    def leaf_cols(self, j: int) -> tuple[int, int]:
        """Columns [start, end) of a line that piece j covers."""
        return j * LEAF_ELEMS, min((j + 1) * LEAF_ELEMS, self.line_len)

    def where(self, leaf: int) -> str:
        line, j = divmod(leaf, max(self.leaves_per_line, 1))
        idx = np.unravel_index(line, self.shape[:-1]) if len(self.shape) > 1 else ()
        a, b = self.leaf_cols(j)
        return f"elements [{', '.join(str(int(i)) for i in idx)}{', ' if idx else ''}{a}:{b}]"


@dataclass
class Pieces:
    """One holder's contribution to a tensor's digest: whole tree nodes and fragments of cut leaves."""

    meta: TensorMeta
    nodes: list[tuple[int, int, bytes]] = field(default_factory=list)  # (first leaf, end leaf, hash)
    frags: list[tuple[int, int, bytes]] = field(default_factory=list)  # (leaf, first element in it, bytes)


def _node(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


def _split(n: int) -> int:
    """Leaves in the left child of an RFC 6962 node of n >= 2 leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _cover(lo: int, hi: int, p: int, q: int, out: list[tuple[int, int]]) -> None:
    """The maximal tree nodes inside leaves [p, q) of the subtree [lo, hi), left to right."""
    if q <= lo or hi <= p:
        return
    if p <= lo and hi <= q:
        out.append((lo, hi))
        return
    k = lo + _split(hi - lo)
    _cover(lo, k, p, q, out)
    _cover(k, hi, p, q, out)


def _fold(leaves: Iterator[bytes], n: int) -> bytes:
    """Root of the RFC 6962 tree over the next n leaf hashes, in O(log n) memory."""
    stack: list[tuple[int, bytes]] = []
    for _ in range(n):
        d, h = next(leaves), 0
        while stack and stack[-1][0] == h:
            d, h = _node(stack.pop()[1], d), h + 1
        stack.append((h, d))
    d = stack.pop()[1]
    while stack:
        d = _node(stack.pop()[1], d)
    return d


def _leaf_hash(data: Any) -> bytes:
    h = _LEAF.copy()
    h.update(data)
    return h.digest()


def _segments_pieces(
    meta: TensorMeta, segments: Iterable[tuple[int, int, int, np.ndarray]], es: int
) -> Pieces:
    """Pieces from line segments (global line, first column, end column, those columns' bytes), in order."""
    out = Pieces(meta)
    runs: list[list[Any]] = []  # [first leaf, end leaf, [(first piece, end piece, first column, bytes)]]
    kpl, L = meta.leaves_per_line, meta.line_len
    for line, c0, c1, raw in segments:
        ja, jb = -(-c0 // LEAF_ELEMS), kpl if c1 == L else c1 // LEAF_ELEMS
        cut = sorted({c0 // LEAF_ELEMS, (c1 - 1) // LEAF_ELEMS} - set(range(ja, jb)))
        for j in cut:  # pieces this segment holds only part of
            a, b = meta.leaf_cols(j)
            lo, hi = max(a, c0), min(b, c1)
            out.frags.append((line * kpl + j, lo - a, raw[(lo - c0) * es : (hi - c0) * es].tobytes()))
        if ja >= jb:
            continue
        first, end = line * kpl + ja, line * kpl + jb
        if runs and runs[-1][1] == first:
            runs[-1][1] = end
            runs[-1][2].append((ja, jb, c0, raw))
        else:
            runs.append([first, end, [(ja, jb, c0, raw)]])
    for first, end, parts in runs:
        leaves = (
            _leaf_hash(raw[(meta.leaf_cols(j)[0] - c0) * es : (meta.leaf_cols(j)[1] - c0) * es])
            for ja, jb, c0, raw in parts
            for j in range(ja, jb)
        )
        spans: list[tuple[int, int]] = []
        _cover(0, meta.leaves, first, end, spans)
        out.nodes += [(lo, hi, _fold(leaves, hi - lo)) for lo, hi in spans]
    return out


def box_pieces(meta: TensorMeta, offsets: Sequence[int], local: Any) -> Pieces:
    """Pieces of the block of the global tensor that starts at `offsets` and holds `local` (its shape)."""
    dtype, shape, raw = tensor_raw(local)
    if dtype != meta.dtype or len(shape) != len(meta.shape) or len(offsets) != len(shape):
        raise DigestError(
            f"a {dtype} block of shape {shape} is not part of a {meta.dtype} tensor {list(meta.shape)}"
        )
    if any(o < 0 or o + s > n for o, s, n in zip(offsets, shape, meta.shape)):
        raise DigestError(
            f"block at {list(offsets)} of shape {shape} exceeds the tensor's shape {list(meta.shape)}"
        )
    if not shape:
        return _segments_pieces(meta, [(0, 0, 1, raw)], raw.size)
    if math.prod(shape) == 0:
        return Pieces(meta)
    rows = raw.reshape(math.prod(shape[:-1]), -1)
    if len(shape) == 1:
        lines = np.zeros(1, np.int64)
    else:
        idx = np.indices(shape[:-1]).reshape(len(shape) - 1, -1) + np.asarray(offsets[:-1])[:, None]
        lines = np.ravel_multi_index(tuple(idx), meta.shape[:-1])
    c0 = offsets[-1]
    es = rows.shape[1] // shape[-1]
    return _segments_pieces(meta, ((int(g), c0, c0 + shape[-1], rows[i]) for i, g in enumerate(lines)), es)


def flat_pieces(meta: TensorMeta, start: int, local: Any) -> Pieces:
    """Pieces of elements [start, start + numel) of the row-major flattening (ZeRO-style flat shards)."""
    dtype, _, raw = tensor_raw(local)
    es, L = itemsize(meta.dtype), meta.line_len
    n = raw.size // es
    if dtype != meta.dtype or start < 0 or start + n > meta.lines * L:
        raise DigestError(
            f"flat range [{start}, {start + n}) of {dtype} is not part of {meta.dtype} {list(meta.shape)}"
        )

    def segments() -> Iterator[tuple[int, int, int, np.ndarray]]:
        pos = start
        while pos < start + n:
            line, c0 = divmod(pos, L)
            c1 = min(L, c0 + start + n - pos)
            yield line, c0, c1, raw[(pos - start) * es : (pos - start + c1 - c0) * es]
            pos += c1 - c0

    return _segments_pieces(meta, segments(), es)


def combine_pieces(pieces: Iterable[Pieces]) -> str:
    """The TENSOR_SCHEME digest from the pieces of all holders; replicas may repeat pieces (they must agree)."""
    pieces = list(pieces)
    if not pieces:
        raise DigestError("no pieces to combine")
    meta = pieces[0].meta
    nodes: dict[tuple[int, int], bytes] = {}
    frags: dict[int, dict[int, bytes]] = {}
    for p in pieces:
        if p.meta != meta:
            raise DigestError(f"pieces of different tensors: {p.meta} and {meta}")
        for lo, hi, d in p.nodes:
            if nodes.setdefault((lo, hi), d) != d:
                raise DigestError(f"two holders disagree on {meta.where(lo)} (replicas differ)")
        for leaf, at, data in p.frags:
            if frags.setdefault(leaf, {}).setdefault(at, data) != data:
                raise DigestError(f"two holders disagree on {meta.where(leaf)} (replicas differ)")
    es = itemsize(meta.dtype)
    for leaf, parts in frags.items():
        a, b = meta.leaf_cols(leaf % meta.leaves_per_line)
        joined, pos = b"", 0
        for at in sorted(parts):
            if at != pos:
                raise DigestError(f"{meta.where(leaf)}: shards leave a gap or overlap at column {a + pos}")
            joined, pos = joined + parts[at], pos + len(parts[at]) // es
        if pos != b - a:
            raise DigestError(f"{meta.where(leaf)}: shards cover {pos} of its {b - a} elements")
        nodes.setdefault((leaf, leaf + 1), _leaf_hash(joined))
    root = _root(meta, nodes, 0, meta.leaves) if meta.leaves else _EMPTY_ROOT
    head = canonical_json({"dtype": meta.dtype, "leaf_elems": LEAF_ELEMS, "scheme": TENSOR_SCHEME,
                           "shape": list(meta.shape)})  # fmt: skip
    return hashlib.sha256(b"\x02" + head + root).hexdigest()


def _root(meta: TensorMeta, nodes: dict[tuple[int, int], bytes], lo: int, hi: int) -> bytes:
    got = nodes.get((lo, hi))
    if got is not None:
        return got
    if hi - lo == 1:
        raise DigestError(f"{meta.where(lo)} is held by no shard")
    k = lo + _split(hi - lo)
    return _node(_root(meta, nodes, lo, k), _root(meta, nodes, k, hi))


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype named as torch names it ("float32", "bfloat16", ...)."""
    import torch

    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise DigestError(f"unknown dtype {dtype!r}")
    return torch.empty(0, dtype=dt).element_size()


def meta_of(t: Any) -> TensorMeta:
    """The TensorMeta of a whole torch/numpy tensor."""
    dtype = str(t.dtype).removeprefix("torch.") if hasattr(t, "detach") else str(np.asarray(t).dtype)
    return TensorMeta(dtype, tuple(int(n) for n in t.shape))


def layout_digest(t: Any) -> str:
    """TENSOR_SCHEME digest of a whole tensor (what any sharded computation of it must give)."""
    return combine_pieces([box_pieces(meta_of(t), (0,) * len(t.shape), t)])

"""The dedup decisions as pure functions over arrays: exact groups, LSH bucket edges, union-find clusters.

A document is named by a ref, the 5-tuple (source, file, record, task, index): the first three are its global
input order (independent of the task count), the last two say where its text sits (text task, position in it).
Refs compare by global order, so "smallest ref" is "first in the input", the canonical survivor of every exact
group and every near-duplicate cluster. Every function below sees its input sorted by ref and only ever compares
refs, so the edges and the decisions are the same whichever task count split the documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

Ref = tuple[int, int, int, int, int]
# One row per document: its bucket key (exact: two 64-bit halves of sha256; near: one band hash) and its ref.
REF_FIELDS = [("o0", "<i8"), ("o1", "<i8"), ("o2", "<i8"), ("task", "<i8"), ("idx", "<i8")]
EXACT_DTYPE = np.dtype([("h0", "<u8"), ("h1", "<u8"), *REF_FIELDS])
BAND_DTYPE = np.dtype([("key", "<u8"), *REF_FIELDS])
# An edge: doc `b` is a duplicate of doc `a` (a < b); `sim` is the estimated Jaccard (1.0 for exact copies).
EDGE_DTYPE = np.dtype(
    [*((f"a_{n}", t) for n, t in REF_FIELDS), *((f"b_{n}", t) for n, t in REF_FIELDS), ("sim", "<f4")]
)
# A bucket whose members match none of its first MAX_REPS distinct documents stops growing representatives:
# such buckets are degenerate (thousands of unrelated docs sharing a band) and the other bands still apply.
MAX_REPS = 64


def text_hash(text: str) -> tuple[int, int]:
    """The exact-dedup key: the first 128 bits of sha256(text) as two uint64 (collisions ~N^2 / 2^129)."""
    d = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:16], "big")


def rows_with_refs(dtype: np.dtype, refs_N5: np.ndarray) -> np.ndarray:
    """Rows of `dtype` (EXACT_DTYPE, BAND_DTYPE) with their ref fields filled from an (N, 5) int64 array."""
    rows = np.zeros(len(refs_N5), dtype=dtype)
    for k, (n, _) in enumerate(REF_FIELDS):
        rows[n] = refs_N5[:, k]
    return rows


def ref_of(row) -> Ref:
    return (int(row["o0"]), int(row["o1"]), int(row["o2"]), int(row["task"]), int(row["idx"]))


def _sorted_groups(rows: np.ndarray, keys: list[str]) -> Iterable[np.ndarray]:
    """Rows sorted by (keys, ref), yielded in runs of equal keys that hold at least two rows."""
    if len(rows) < 2:
        return
    order = np.lexsort([rows[k] for k in reversed([*keys, "o0", "o1", "o2"])])
    rows = rows[order]
    same = np.ones(len(rows) - 1, dtype=bool)
    for k in keys:
        same &= rows[k][1:] == rows[k][:-1]
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.concatenate([starts[1:], [len(rows)]])
    for s, e in zip(starts, ends):
        if e - s > 1:
            yield rows[s:e]


def _edge(a, b, sim: float) -> tuple:
    return (*ref_of(a), *ref_of(b), sim)


def exact_edges(rows: np.ndarray) -> np.ndarray:
    """EXACT_DTYPE rows -> edges (first copy, later copy) for every group of equal text hashes."""
    out = [_edge(g[0], r, 1.0) for g in _sorted_groups(rows, ["h0", "h1"]) for r in g[1:]]
    return np.array(out, dtype=EDGE_DTYPE)


def bucket_edges(
    rows: np.ndarray, signature: Callable[[int, int], np.ndarray], threshold: float
) -> np.ndarray:
    """BAND_DTYPE rows of one band -> near-duplicate edges. In each bucket (equal key), members in input order
    join the first representative whose full signature agrees on >= `threshold` of its values; a member that
    joins none becomes a representative. `signature(task, idx)` returns a document's MinHash signature."""
    out = []
    for g in _sorted_groups(rows, ["key"]):
        reps = [g[0]]
        rep_sigs = [signature(int(g[0]["task"]), int(g[0]["idx"]))]
        for r in g[1:]:
            sig = signature(int(r["task"]), int(r["idx"]))
            sims = (np.stack(rep_sigs) == sig[None, :]).mean(axis=1)
            hit = np.flatnonzero(sims >= threshold)
            if hit.size:
                out.append(_edge(reps[hit[0]], r, float(sims[hit[0]])))
            elif len(reps) < MAX_REPS:
                reps.append(r)
                rep_sigs.append(sig)
    return np.array(out, dtype=EDGE_DTYPE)


def split_edge(e) -> tuple[Ref, Ref, float]:
    a = tuple(int(e[f"a_{n}"]) for n, _ in REF_FIELDS)
    b = tuple(int(e[f"b_{n}"]) for n, _ in REF_FIELDS)
    return a, b, float(e["sim"])  # type: ignore[return-value]


@dataclass(frozen=True)
class Decision:
    """Why document `ref` is removed: `reason` exact_duplicate | near_duplicate; `survivor` is the kept document
    of its exact group / cluster, `partner` its most similar neighbour (estimated Jaccard `sim`)."""

    ref: Ref
    reason: str
    survivor: Ref
    partner: Ref
    sim: float
    cluster_size: int


class _UnionFind:
    """Union-find whose root is always the smallest ref of its set (the canonical survivor)."""

    def __init__(self) -> None:
        self.parent: dict[Ref, Ref] = {}

    def find(self, x: Ref) -> Ref:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: Ref, b: Ref) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.parent.setdefault(lo, lo)


def _best_partners(edges: Iterable[tuple[Ref, Ref, float]]) -> dict[Ref, tuple[float, Ref]]:
    """Per document: its most similar neighbour (ties: the earliest one)."""
    best: dict[Ref, tuple[float, Ref]] = {}
    for a, b, sim in edges:
        for x, y in ((a, b), (b, a)):
            cur = best.get(x)
            if cur is None or (sim, _neg(y)) > (cur[0], _neg(cur[1])):
                best[x] = (sim, y)
    return best


def _neg(r: Ref) -> tuple:
    return tuple(-v for v in r)


def decide(exact: np.ndarray, near: np.ndarray) -> list[Decision]:
    """Edges -> one Decision per removed document, sorted by ref. Exact copies of an earlier document are
    `exact_duplicate` (their survivor: the first copy); every other non-survivor of a connected component of
    near edges is `near_duplicate` (its survivor: the component's first document)."""
    exact_of: dict[Ref, Ref] = {}
    for a, b, _ in map(split_edge, exact):
        exact_of[b] = min(a, exact_of.get(b, a))
    near_edges = [split_edge(e) for e in near]
    uf = _UnionFind()
    for a, b, _ in near_edges:
        uf.union(a, b)
    sizes: dict[Ref, int] = {}
    for x in uf.parent:
        root = uf.find(x)
        sizes[root] = sizes.get(root, 0) + 1
    best = _best_partners(near_edges)
    out = []
    for ref in sorted(set(exact_of) | set(uf.parent)):
        if ref in exact_of:
            out.append(Decision(ref, "exact_duplicate", exact_of[ref], exact_of[ref], 1.0, 0))
            continue
        root = uf.find(ref)
        if root != ref:
            sim, partner = best[ref]
            out.append(Decision(ref, "near_duplicate", root, partner, sim, sizes[root]))
    return out

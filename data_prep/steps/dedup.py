"""Applying the dedup decisions: exact (sha256 of the normalised text) and MinHash-LSH near duplicates.

The first document in global input order (source, file, record) of each exact group and each near-duplicate
cluster is kept; every other member is removed with the kept document's id in its detail. The decisions come
from the distributed stages (data_prep/steps/dedup_dist.py) or, in one process, from DedupStep below; both run
the same functions (data_prep/dedup_core.py), so they remove the same documents.
"""

from __future__ import annotations

import numpy as np

from data_prep.config import DedupConfig
from data_prep.dedup_core import (
    BAND_DTYPE,
    EDGE_DTYPE,
    EXACT_DTYPE,
    bucket_edges,
    decide,
    exact_edges,
    rows_with_refs,
    text_hash,
)
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts
from data_prep.steps.dedup_dist import decision_record, dedup_dir, read_decisions
from data_prep.steps.minhash import MinHasher


class _ApplyDecisions(DocStep):
    """Removes the documents named in `self.decisions` (doc id -> decision record)."""

    name = "dedup"

    def __init__(self, out_dir):
        super().__init__(out_dir)
        self.decisions: dict[str, dict] = {}
        self.applied = 0

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        d = self.decisions.get(doc.id)
        if d is None:
            return doc
        self.applied += 1
        return Drop(d["reason"], detail=d["detail"])


class DedupFilter(_ApplyDecisions):
    """The `dedup` stage's step: text task `rank`'s documents minus the removals the cluster stage decided."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.decisions = read_decisions(dedup_dir(self.out_dir) / "decisions" / f"{rank:05d}.jsonl.gz")
        yield from super().run(data, rank, world_size)
        if self.applied != len(self.decisions):  # the text stage's output changed after the cluster stage ran
            raise RuntimeError(
                f"dedup task {rank}: {len(self.decisions) - self.applied} removal decisions name documents "
                f"not in {self.out_dir}/work/text/{rank:05d}.jsonl.gz; rebuild into a new --out"
            )


class DedupStep(_ApplyDecisions):
    """All of dedup in one process over the documents it is given (benchmarks, small corpora, tests)."""

    progress = True

    def __init__(self, out_dir, cfg: DedupConfig):
        super().__init__(out_dir)
        self.cfg = cfg
        self._prepared = False

    def prepare(self, docs: list[Doc]) -> None:
        """Decide over all of `docs` (a document's fate depends on the others); `apply` then removes them."""
        self.decisions = {r["id"]: r for r in dedup_decisions(docs, self.cfg)}
        self._prepared = True

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if not self._prepared:
            raise RuntimeError(
                "DedupStep decides over all documents at once: call prepare(docs) or run(docs)"
            )
        return super().apply(doc, counts)

    def run(self, data, rank: int = 0, world_size: int = 1):
        docs = list(data or ())
        self.prepare(docs)
        yield from super().run(iter(docs), rank, world_size)


def dedup_decisions(docs: list[Doc], cfg: DedupConfig) -> list[dict]:
    """Decision records for `docs` (each in its input order), computed in this process."""
    refs = np.array([(*d.order, 0, i) for i, d in enumerate(docs)], dtype=np.int64).reshape(-1, 5)
    exact = np.zeros(0, dtype=EDGE_DTYPE)
    near = np.zeros(0, dtype=EDGE_DTYPE)
    if cfg.exact:
        rows = rows_with_refs(EXACT_DTYPE, refs)
        hashes = np.array([text_hash(d.text) for d in docs], dtype=np.uint64).reshape(-1, 2)
        rows["h0"], rows["h1"] = hashes[:, 0], hashes[:, 1]
        exact = exact_edges(rows)
    if cfg.near:
        hasher = MinHasher(cfg.ngram, cfg.num_perm, cfg.bands, cfg.seed)
        sigs = np.array([hasher.signature(d.text) for d in docs], dtype=np.uint32).reshape(-1, cfg.num_perm)
        keys = hasher.band_hashes(sigs)
        parts = []
        for b in range(cfg.bands):
            rows = rows_with_refs(BAND_DTYPE, refs)
            rows["key"] = keys[:, b]
            parts.append(bucket_edges(rows, lambda _t, i: sigs[i], cfg.threshold))
        near = np.concatenate(parts)
    ids = {(0, i): d.id for i, d in enumerate(docs)}
    return [decision_record(d, ids) for d in decide(exact, near)]

"""Exact dedup (sha256 of the normalised text) and MinHash-LSH near dedup; the first document seen is kept.

"First" is the global order (source, file, record), so the kept set does not depend on the task count.
"""

from __future__ import annotations

import hashlib

from data_prep.config import DedupConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts
from data_prep.steps.minhash import LshIndex, MinHasher


class DedupStep(DocStep):
    name = "dedup"
    progress = True

    def __init__(self, out_dir, cfg: DedupConfig):
        super().__init__(out_dir)
        self.cfg = cfg
        self._seen: dict[bytes, str] | None = None
        self._lsh: LshIndex | None = None

    def setup(self) -> None:
        self._seen = {}
        c = self.cfg
        self._lsh = LshIndex(MinHasher(c.ngram, c.num_perm, c.bands, c.seed), c.threshold)

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if self.cfg.exact:
            key = hashlib.sha256(doc.text.encode("utf-8")).digest()
            first = self._seen.setdefault(key, doc.id)
            if first != doc.id:
                return Drop("exact_duplicate", detail=f"duplicate of {first}")
        if self.cfg.near:
            first, sim = self._lsh.query_add(doc.id, doc.text)
            if first:
                return Drop("near_duplicate", detail=f"~{sim:.2f} Jaccard with {first}")
        return doc

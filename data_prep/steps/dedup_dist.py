"""Distributed dedup, shaped like datatrove's MinHash dedup (signature -> buckets -> cluster -> filter), plus
exact dedup by hash prefix. Files live under OUT/work/dedup/:

  dedup-signatures (T tasks)  text task t -> docs/t.npz (refs, ids), sigs/t.npy (N, num_perm) uint32,
                              bands/<band>/t.npy (band key + ref, per band), exact/<prefix>/t.npy (sha256 + ref)
  dedup-exact      (T tasks)  prefix p: every exact/p/*.npy -> exact_edges/p.npy (first copy, later copy)
  dedup-buckets    (min(T, bands) tasks)  bands b = k, k+K, ...: bands/b/*.npy -> edges/k.npy (verified pairs)
  dedup-clusters   (1 task)   every edge -> union-find -> decisions/t.jsonl.gz (the removed docs of text task t)
  dedup            (T tasks)  text task t + decisions/t -> kept corpus (data_prep/steps/dedup.py DedupFilter)

Why not datatrove's own MinhashDedupSignature/Buckets/Cluster: its shingles are word n-grams from a word
tokenizer (Korean particles attach to words, see minhash.py), its bucket stage needs the task count to be a
multiple of the band count, and its cluster stage keeps the root of a union by size over (file, doc) indices,
so which copy survives depends on how the corpus was split. Here a document is a ref whose order is its global
input position (data_prep/dedup_core.py), and the first one in the input survives, at any task count.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep

from data_prep.config import DedupConfig
from data_prep.dedup_core import (
    BAND_DTYPE,
    EDGE_DTYPE,
    EXACT_DTYPE,
    Decision,
    bucket_edges,
    decide,
    exact_edges,
    rows_with_refs,
    text_hash,
)
from data_prep.stages import stage1_dir
from data_prep.steps.minhash import MinHasher

log = logging.getLogger(__name__)


def dedup_dir(out_dir) -> Path:
    return Path(out_dir) / "work" / "dedup"


def _save(path: Path, arr: np.ndarray) -> None:
    """np.save through a temporary name: a killed task never leaves a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)


def _load_all(folder: Path) -> np.ndarray | None:
    files = sorted(folder.glob("*.npy"))
    return np.concatenate([np.load(f) for f in files]) if files else None


def _hasher(cfg: DedupConfig) -> MinHasher:
    return MinHasher(cfg.ngram, cfg.num_perm, cfg.bands, cfg.seed)


class DedupStageStep(PipelineStep):
    type = "kmoe"

    def __init__(self, out_dir, cfg: DedupConfig, text_tasks: int):
        super().__init__()
        self.out_dir, self.cfg, self.text_tasks = str(out_dir), cfg, text_tasks

    @property
    def root(self) -> Path:
        return dedup_dir(self.out_dir)


class DedupSignatures(DedupStageStep):
    """Per text task: refs and ids, MinHash signatures, band keys per band, exact hashes per prefix."""

    name = "dedup-signatures"

    def run(self, data, rank: int = 0, world_size: int = 1):
        hasher = _hasher(self.cfg)
        refs, ids, hashes, sigs = [], [], [], []
        with self.track_time():
            for i, doc in enumerate(data or ()):  # streamed: only hashes are held, never the texts
                refs.append((*doc.order, rank, i))
                ids.append(doc.id)
                if self.cfg.exact:
                    hashes.append(text_hash(doc.text))
                if self.cfg.near:
                    sigs.append(hasher.signature(doc.text))
            ref_rows = np.array(refs, dtype=np.int64).reshape(-1, 5)
            docs = self.root / "docs" / f"{rank:05d}.npz"
            docs.parent.mkdir(parents=True, exist_ok=True)
            with open(docs.with_name(docs.name + ".tmp"), "wb") as f:
                np.savez(f, ids=np.array(ids, dtype=str))
            docs.with_name(docs.name + ".tmp").replace(docs)
            if self.cfg.exact:
                self._write_exact(np.array(hashes, dtype=np.uint64).reshape(-1, 2), ref_rows, rank)
            if self.cfg.near:
                self._write_near(
                    np.array(sigs, dtype=np.uint32).reshape(-1, self.cfg.num_perm), ref_rows, rank
                )
        self.stat_update("docs", value=len(refs))
        return iter(())

    def _write_exact(self, hashes: np.ndarray, refs: np.ndarray, rank: int) -> None:
        rows = rows_with_refs(EXACT_DTYPE, refs)
        rows["h0"], rows["h1"] = hashes[:, 0], hashes[:, 1]
        prefix = rows["h0"] % np.uint64(self.text_tasks)
        for p in range(self.text_tasks):
            _save(self.root / "exact" / f"{p:05d}" / f"{rank:05d}.npy", rows[prefix == p])

    def _write_near(self, sigs: np.ndarray, refs: np.ndarray, rank: int) -> None:
        _save(self.root / "sigs" / f"{rank:05d}.npy", sigs)
        keys = _hasher(self.cfg).band_hashes(sigs)
        for b in range(self.cfg.bands):
            rows = rows_with_refs(BAND_DTYPE, refs)
            rows["key"] = keys[:, b]
            _save(self.root / "bands" / f"{b:03d}" / f"{rank:05d}.npy", rows)


class ExactDedupTask(DedupStageStep):
    """Hash prefix `rank`: groups equal text hashes across every text task."""

    name = "dedup-exact"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time():
            edges = np.zeros(0, dtype=EDGE_DTYPE)
            for p in range(rank, self.text_tasks, world_size):
                rows = _load_all(self.root / "exact" / f"{p:05d}")
                if rows is not None:
                    edges = np.concatenate([edges, exact_edges(rows)])
            _save(self.root / "exact_edges" / f"{rank:05d}.npy", edges)
        log.info("exact dedup task %d: %d duplicate copies", rank, len(edges))
        self.stat_update("exact_copies", value=len(edges))
        return iter(())


class LshBucketTask(DedupStageStep):
    """Bands rank, rank + world_size, ...: candidate pairs sharing a band key, confirmed on full signatures."""

    name = "dedup-buckets"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        sigs: dict[int, np.ndarray] = {}

        def signature(task: int, idx: int) -> np.ndarray:
            if task not in sigs:  # memory-mapped: only the rows of candidate pairs are read
                sigs[task] = np.load(self.root / "sigs" / f"{task:05d}.npy", mmap_mode="r")
            return np.asarray(sigs[task][idx])

        parts = []
        with self.track_time():
            for b in range(rank, self.cfg.bands, world_size):
                rows = _load_all(self.root / "bands" / f"{b:03d}")
                if rows is not None:
                    parts.append(bucket_edges(rows, signature, self.cfg.threshold))
                    log.info("band %d: %d documents, %d confirmed pairs", b, len(rows), len(parts[-1]))
            edges = np.concatenate(parts) if parts else np.zeros(0, dtype=EDGE_DTYPE)
            _save(self.root / "edges" / f"{rank:05d}.npy", edges)
        self.stat_update("pairs", value=len(edges))
        return iter(())


class ClusterTask(DedupStageStep):
    """One task: every exact and near edge -> union-find -> the removed documents of each text task."""

    name = "dedup-clusters"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.track_time():
            exact = _load_all(self.root / "exact_edges")
            near = _load_all(self.root / "edges")
            decisions = decide(
                exact if exact is not None else np.zeros(0, EDGE_DTYPE),
                near if near is not None else np.zeros(0, EDGE_DTYPE),
            )
            ids = _ids_of(self.root, decisions)
            by_task: dict[int, list[dict]] = {t: [] for t in range(self.text_tasks)}
            for d in decisions:
                by_task[d.ref[3]].append(decision_record(d, ids))
            for t, recs in by_task.items():
                write_decisions(self.root / "decisions" / f"{t:05d}.jsonl.gz", recs)
        log.info("dedup clusters: %d documents removed", len(decisions))
        self.stat_update("removed", value=len(decisions))
        return iter(())


def _ids_of(root: Path, decisions: list[Decision]) -> dict[tuple[int, int], str]:
    """Doc ids of every ref a decision names, read one text task's id list at a time."""
    need: dict[int, set[int]] = {}
    for d in decisions:
        for r in (d.ref, d.survivor, d.partner):
            need.setdefault(r[3], set()).add(r[4])
    out = {}
    for task, idxs in need.items():
        with np.load(root / "docs" / f"{task:05d}.npz") as z:
            ids = z["ids"]
            out.update({(task, i): str(ids[i]) for i in idxs})
    return out


def decision_record(d: Decision, ids: dict[tuple[int, int], str]) -> dict:
    """The removal of one document as the filter task applies it (and the removed record's detail)."""
    name = lambda r: ids[(r[3], r[4])]  # noqa: E731
    if d.reason == "exact_duplicate":
        detail = f"duplicate of {name(d.survivor)}"
    else:
        detail = f"~{d.sim:.2f} Jaccard with {name(d.partner)}; cluster of {d.cluster_size} keeps {name(d.survivor)}"
    return {"id": name(d.ref), "idx": d.ref[4], "reason": d.reason, "detail": detail}


def write_decisions(path: Path, recs: list[dict]) -> None:
    from data_prep.records import JsonlGzWriter

    w = JsonlGzWriter(path)
    try:
        for r in recs:
            w.write(r)
    finally:
        w.close()


def read_decisions(path: Path) -> dict[str, dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def text_part(out_dir, rank: int) -> Path:
    return stage1_dir(out_dir) / f"{rank:05d}.jsonl.gz"

"""Glue steps between stages: the text stage's output, its order-preserving merge, the kept-corpus writer."""

from __future__ import annotations

import heapq
from collections import defaultdict
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep.records import Doc, JsonlGzWriter, read_jsonl_gz, write_json


def stage1_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "work" / "text"


class Stage1Writer(PipelineStep):
    """Writes the text stage's survivors of this task, in input order, to OUT/work/text/<rank>.jsonl.gz."""

    type = "kmoe"
    name = "text-out"

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)

    def run(self, data, rank: int = 0, world_size: int = 1):
        w = JsonlGzWriter(stage1_dir(self.out_dir) / f"{rank:05d}.jsonl.gz")
        try:
            for doc in data:
                w.write(doc.to_json())
        finally:
            w.close()
        return iter(())


class Stage1Reader(PipelineStep):
    """Merges every text-stage file by global order key (each file is already sorted)."""

    type = "kmoe"
    name = "text-in"

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        files = sorted(stage1_dir(self.out_dir).glob("*.jsonl.gz"))
        streams = [(Doc.from_json(d) for d in read_jsonl_gz(f)) for f in files]
        yield from heapq.merge(*streams, key=lambda d: d.order)


class KeptWriter(PipelineStep):
    """Writes the kept corpus: OUT/corpus/kept/<lang>/<shard>.jsonl.gz, `shard_docs` documents per file."""

    type = "kmoe"
    name = "kept-out"

    def __init__(self, out_dir, shard_docs: int):
        super().__init__()
        self.out_dir, self.shard_docs = str(out_dir), shard_docs

    def run(self, data, rank: int = 0, world_size: int = 1):
        writers: dict[str, JsonlGzWriter] = {}
        shard_no: dict[str, int] = defaultdict(int)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        root = Path(self.out_dir) / "corpus" / "kept"
        try:
            for doc in data:
                w = writers.get(doc.lang)
                if w is not None and w.count >= self.shard_docs:
                    w.close()
                    shard_no[doc.lang] += 1
                    w = None
                if w is None:
                    w = writers[doc.lang] = JsonlGzWriter(
                        root / doc.lang / f"{shard_no[doc.lang]:05d}.jsonl.gz"
                    )
                w.write(doc.record())
                counts[doc.lang][doc.source] += 1
        finally:
            for w in writers.values():
                w.close()
        write_json(Path(self.out_dir) / "work" / "kept_counts.json", counts)
        return iter(())

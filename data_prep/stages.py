"""Glue steps between stages: the text stage's output, its reader for the dedup tasks, the kept-corpus writer."""

from __future__ import annotations

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


class TextPartReader(PipelineStep):
    """Reads text task `rank`'s output (OUT/work/text/<rank>.jsonl.gz), in its order: the dedup stages run as
    many tasks as the text stage, task t on text task t's documents."""

    type = "kmoe"
    name = "text-in"

    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = str(out_dir)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for d in read_jsonl_gz(stage1_dir(self.out_dir) / f"{rank:05d}.jsonl.gz"):
            yield Doc.from_json(d)


class KeptWriter(PipelineStep):
    """Writes task `rank`'s kept corpus: OUT/corpus/kept/<lang>/<rank>-<part>.jsonl.gz, `shard_docs` documents
    per file. Text tasks hold contiguous runs of input files (ReadStep), so the files in name order hold the
    kept documents in global input order, whatever the task count."""

    type = "kmoe"
    name = "kept-out"

    def __init__(self, out_dir, shard_docs: int):
        super().__init__()
        self.out_dir, self.shard_docs = str(out_dir), shard_docs

    def run(self, data, rank: int = 0, world_size: int = 1):
        writers: dict[str, JsonlGzWriter] = {}
        shard_no: dict[str, int] = defaultdict(int)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        files: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
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
                        root / doc.lang / f"{rank:05d}-{shard_no[doc.lang]:04d}.jsonl.gz"
                    )
                w.write(doc.record())
                counts[doc.lang][doc.source] += 1
                files[doc.lang][w.path.name] += 1
        finally:
            for w in writers.values():
                w.close()
        work = Path(self.out_dir) / "work"
        write_json(work / "kept_counts" / f"{rank:05d}.json", counts)
        for (
            lang,
            per_file,
        ) in files.items():  # records per kept file: shards tasks find their range without reading
            write_json(work / "kept_index" / lang / f"{rank:05d}.json", per_file)
        return iter(())

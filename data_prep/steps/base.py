"""The step protocol: `apply(doc) -> doc | Drop`, run as a datatrove PipelineStep that accounts for every doc.

Each step counts in = kept + removed(by reason) + errors(by reason), writes every removed document with its
reason, PII redacted (data_prep/removed.py), to OUT/corpus/removed/<step>/<rank>.jsonl.gz and its counters to
OUT/work/stats/<step>/<rank>.json.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep.config import PiiConfig
from data_prep.records import Doc, write_json
from data_prep.removed import RemovedWriter


@dataclass
class Drop:
    """A document leaves the pipeline: `error` marks bad input (vs. a filter's decision)."""

    reason: str
    error: bool = False
    detail: str = ""


class StepCounts:
    """Per-step counters; `notes` hold extra counts (repairs, PII kinds) that are not removals. `by_source`
    repeats in/kept/removed/errors per source (filled by `doc_in`, `keep` and `drop`)."""

    def __init__(self) -> None:
        self.n_in = 0
        self.kept = 0
        self.removed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.by_source: dict[str, Counter[str]] = {}

    def doc_in(self, source: str) -> None:
        self.n_in += 1
        self.by_source.setdefault(source, Counter())["in"] += 1

    def keep(self, source: str) -> None:
        self.kept += 1
        self.by_source.setdefault(source, Counter())["kept"] += 1

    def drop(self, source: str, reason: str, error: bool) -> None:
        (self.errors if error else self.removed)[reason] += 1
        self.by_source.setdefault(source, Counter())["errors" if error else "removed"] += 1

    def to_json(self) -> dict:
        keys = ("in", "kept", "removed", "errors")
        return {
            "in": self.n_in,
            "kept": self.kept,
            "removed": dict(sorted(self.removed.items())),
            "errors": dict(sorted(self.errors.items())),
            "notes": dict(sorted(self.notes.items())),
            "by_source": {s: {k: c[k] for k in keys} for s, c in sorted(self.by_source.items())},
        }


class DocStep(PipelineStep):
    """Base of every kmoe data step. Subclasses set `name` and implement `apply`."""

    type = "kmoe"
    name = "step"
    progress = False  # a tqdm bar (on a terminal) for steps that run as one long task
    # How removed records are redacted; the pipeline sets the build's `pii:` settings (the default redacts all).
    redact_with: PiiConfig = PiiConfig()

    def __init__(self, out_dir: str | Path):
        super().__init__()
        self.out_dir = str(out_dir)

    def setup(self) -> None:
        """Load models once per task (not in __init__, so the step pickles cheaply)."""

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        raise NotImplementedError

    def finish(self, counts: StepCounts) -> Iterator[Doc]:
        """Called after the last doc; steps that hold docs back (none yet) may yield them here."""
        return iter(())

    def removed_path(self, rank: int) -> Path:
        return Path(self.out_dir) / "corpus" / "removed" / self.name / f"{rank:05d}.jsonl.gz"

    def stats_path(self, rank: int) -> Path:
        return Path(self.out_dir) / "work" / "stats" / self.name / f"{rank:05d}.json"

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.setup()
        counts = StepCounts()
        writer = RemovedWriter(self.removed_path(rank), self.redact_with, counts)
        if self.progress:
            from tqdm import tqdm

            data = tqdm(data or (), desc=self.name, unit=" docs", disable=None, mininterval=1.0)
        try:
            for doc in data or ():
                counts.doc_in(doc.source)
                with self.track_time():
                    result = self.apply(doc, counts)
                if isinstance(result, Drop):
                    counts.drop(doc.source, result.reason, result.error)
                    writer.write(doc, self.name, result.reason, result.error, result.detail)
                    continue
                counts.keep(doc.source)
                yield result
            for doc in self.finish(counts):
                yield doc
        finally:
            writer.close()
            write_json(self.stats_path(rank), counts.to_json())

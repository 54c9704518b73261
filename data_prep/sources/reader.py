"""The first step of the text stage: read this task's share of input units, a contiguous run of the global unit
list (task t of T reads units [t*N/T, (t+1)*N/T)), so text task outputs in rank order are in global order."""

from __future__ import annotations

import logging
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from data_prep.config import PiiConfig, SourceConfig
from data_prep.records import write_json
from data_prep.removed import RemovedWriter
from data_prep.sources.files import list_units, read_unit
from data_prep.steps.base import StepCounts

log = logging.getLogger(__name__)


def task_units(units: list, rank: int, world_size: int) -> list:
    """Task `rank`'s contiguous share of `units` (sizes differ by at most one)."""
    n = len(units)
    return units[rank * n // world_size : (rank + 1) * n // world_size]


class ReadStep(PipelineStep):
    """Yields raw records. A unit that cannot be read is an error (with the file and reason), not a crash."""

    type = "kmoe"
    name = "read"

    def __init__(
        self, out_dir: str | Path, sources: list[SourceConfig], roots: list[str], pii: PiiConfig | None = None
    ):
        super().__init__()
        self.out_dir, self.sources, self.roots = str(out_dir), sources, roots
        self.pii = pii or PiiConfig()  # the error detail (an exception message) is redacted like any record

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        counts = StepCounts()
        units = list_units(self.sources, [Path(r) for r in self.roots])
        mine = task_units(units, rank, world_size)
        errors = RemovedWriter(
            Path(self.out_dir) / "corpus" / "removed" / "read" / f"{rank:05d}.jsonl.gz", self.pii, counts
        )
        try:
            for unit in mine:
                src, root = self.sources[unit.source_index], Path(self.roots[unit.source_index])
                n = 0
                try:
                    for doc in read_unit(unit, src, root):
                        n += 1
                        counts.doc_in(src.name)
                        counts.keep(src.name)
                        yield doc
                except (OSError, ValueError, EOFError) as e:
                    # A truncated .gz or an unreadable parquet: records read so far are kept, the rest of
                    # the file is one error naming the file.
                    counts.doc_in(src.name)
                    counts.drop(src.name, "unreadable_file", error=True)
                    errors.write_record(
                        {"id": unit.path, "source": src.name, "step": "read", "reason": "unreadable_file",
                         "error": True, "detail": f"{unit.path}: after {n} records: {e}", "text": ""}
                    )  # fmt: skip
                    log.error("source %s: cannot read %s after %d records: %s", src.name, unit.path, n, e)
                if n == 0:
                    counts.notes["empty_files"] += 1
                counts.notes["files"] += 1
        finally:
            errors.close()
            write_json(Path(self.out_dir) / "work" / "stats" / "read" / f"{rank:05d}.json", counts.to_json())

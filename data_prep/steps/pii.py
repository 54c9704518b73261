"""The PII step: kept documents get validated PII replaced by placeholders, counted per kind.

Detection lives in data_prep/pii_detect.py. Documents removed by any step are redacted with the same settings
when their record is written (data_prep/removed.py), so no output holds the values this step replaces.
"""

from __future__ import annotations

from data_prep.config import PiiConfig
from data_prep.pii_detect import PLACEHOLDER
from data_prep.records import Doc
from data_prep.removed import redact
from data_prep.steps.base import DocStep, Drop, StepCounts


def check_kinds(cfg: PiiConfig) -> None:
    unknown = set(cfg.kinds) - set(PLACEHOLDER)
    if unknown:
        raise ValueError(f"pii.kinds: unknown kind(s) {sorted(unknown)}; known: {sorted(PLACEHOLDER)}")


class PiiStep(DocStep):
    name = "pii"

    def __init__(self, out_dir, cfg: PiiConfig):
        super().__init__(out_dir)
        check_kinds(cfg)
        self.cfg = self.redact_with = cfg

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        doc.text, n = redact(doc.text, doc.lang, self.cfg, counts)
        if n:
            counts.notes["docs_with_pii"] += 1
        return doc

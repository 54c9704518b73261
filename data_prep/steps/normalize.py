"""Normalisation that is safe for Korean: NFC (never NFKC), line endings, control and zero-width characters,
trailing spaces and runs of blank lines. Code keeps its indentation and inner spacing."""

from __future__ import annotations

import re
import unicodedata

from data_prep.config import NormalizeConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts

# C0/C1 controls except tab and newline; zero-width and BOM characters that only hide differences.
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t\u3000]+$", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0\u3000]{2,}")


def normalize_text(text: str, cfg: NormalizeConfig, is_code: bool = False) -> str:
    """Pure normalisation; idempotent."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize(cfg.form, text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    if not is_code:
        text = _SPACES.sub(" ", text)
    blank = "\n" * (cfg.max_blank_lines + 1)
    text = re.sub("\n{" + str(cfg.max_blank_lines + 2) + ",}", blank, text)
    return text.strip("\n") if is_code else text.strip()


class NormalizeStep(DocStep):
    name = "normalize"

    def __init__(self, out_dir, cfg: NormalizeConfig):
        super().__init__(out_dir)
        self.cfg = cfg

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        new = normalize_text(doc.text, self.cfg, is_code=doc.lang == "code")
        if new != doc.text:
            counts.notes["changed"] += 1
        doc.text = new
        if not new.strip():
            return Drop("empty")
        return doc

"""Removed-document records: why and where a document left the pipeline, with its personal data redacted.

Every removed or rejected document becomes one line of OUT/corpus/removed/<step>/<name>.jsonl.gz:
  {"id", "source", "lang", "step", "reason", "error", "sha256", "bytes", "text"[, "detail", "truncated"]}
`id` names the input file and line (JSONL), row (Parquet, saved datasets) or file (text sources), so whoever
holds the input can find the original; `sha256` is the hash of the document as the step saw it (its text, or
its raw bytes before decoding) and `bytes` its UTF-8 size; `text` is an excerpt (the first REMOVED_TEXT_CAP
characters) in which the PII kinds of the build's `pii:` settings are replaced by placeholders, whatever step
removed the document, so `corpus/removed/` (hashed into the manifest and shipped) carries no personal data.
Replacements are counted as `pii:<kind>` notes of the removing step; stats.json sums them over all steps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from data_prep.config import PiiConfig
from data_prep.pii_detect import scrub
from data_prep.records import Doc, JsonlGzWriter

REMOVED_TEXT_CAP = 100_000  # removed docs larger than this keep a prefix; the id points at the original
_SCRUB_MARGIN = 200  # redact a little past the cut, so a value straddling it is not left half visible


def redact(text: str, lang: str, pii: PiiConfig, counts) -> tuple[str, int]:
    """`text` with PII replaced per `pii`, and the number of replacements (also counted as `pii:<kind>`
    notes on `counts`, a StepCounts)."""
    if lang == "code" and not pii.apply_to_code:
        return text, 0
    text, found = scrub(text, pii.kinds)
    for kind, n in found.items():
        counts.notes[f"pii:{kind}"] += n
    return text, sum(found.values())


def removed_record(doc: Doc, step: str, reason: str, error: bool, detail: str = "") -> dict[str, Any]:
    """A removed document before redaction: the doc's identity, why, its hash and an excerpt."""
    keep = REMOVED_TEXT_CAP + _SCRUB_MARGIN
    if doc.text or doc.raw is None:
        full = doc.text.encode("utf-8", errors="replace")
        excerpt = doc.text[:keep]
        truncated = len(doc.text) > REMOVED_TEXT_CAP
    else:  # removed before decoding: the raw bytes, read as UTF-8 for the excerpt
        full = doc.raw
        decoded = doc.raw[: keep * 4].decode("utf-8", errors="replace")
        excerpt = decoded[:keep]
        truncated = len(decoded) > REMOVED_TEXT_CAP or len(full) > keep * 4
    rec = {
        "id": doc.id,
        "source": doc.source,
        "lang": doc.lang,
        "step": step,
        "reason": reason,
        "error": error,
        "sha256": hashlib.sha256(full).hexdigest(),
        "bytes": len(full),
        "text": excerpt,
    }
    if truncated:
        rec["truncated"] = True
    if detail:
        rec["detail"] = detail
    return rec


class RemovedWriter:
    """Writes redacted removed-document records; `counts` (a StepCounts) receives the `pii:<kind>` notes."""

    def __init__(self, path: Path, pii: PiiConfig, counts):
        self._w = JsonlGzWriter(path)
        self.pii, self.counts = pii, counts

    def write(self, doc: Doc, step: str, reason: str, error: bool, detail: str = "") -> None:
        self.write_record(removed_record(doc, step, reason, error, detail))

    def write_record(self, rec: dict[str, Any]) -> None:
        """Redact the free-text fields of `rec` (`text`, `detail`) and write it."""
        rec = dict(rec)
        lang = rec.get("lang", "")
        rec["text"] = redact(rec.get("text", ""), lang, self.pii, self.counts)[0][:REMOVED_TEXT_CAP]
        if rec.get("detail"):
            rec["detail"] = redact(rec["detail"], lang, self.pii, self.counts)[0]
        self._w.write(rec)

    def close(self) -> None:
        self._w.close()

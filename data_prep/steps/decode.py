"""Decode and repair: bytes -> str (UTF-8, else CP949/EUC-KR when it reads as Korean), NUL bytes, JSON fields.

Every outcome is counted: repairs as notes (`repair:cp949`, `repair:nul`, `repair:invalid_utf8`), rejects as
errors with a reason (`malformed_json`, `missing_field:text`, `invalid_utf8`, `binary`, `too_long`, ...).
"""

from __future__ import annotations

import json

from data_prep.config import DecodeConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts
from data_prep.steps.scripts import hangul_share


def decode_bytes(raw: bytes, cfg: DecodeConfig) -> tuple[str | None, list[str], str]:
    """Bytes -> (text or None, repairs made, reject reason). Pure; used for JSONL lines and text files."""
    repairs = []
    if b"\x00" in raw:
        if raw.count(b"\x00") > cfg.max_nul_frac * len(raw):
            return None, repairs, "binary"
        raw = raw.replace(b"\x00", b"")
        repairs.append("nul")
    try:
        return raw.decode("utf-8"), repairs, ""
    except UnicodeDecodeError:
        pass
    for enc in cfg.legacy_encodings:
        try:
            text = raw.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        # A legacy decode "succeeds" on many byte strings; accept it only when the result reads as Korean.
        if hangul_share(text) >= 0.3:
            return text, [*repairs, enc], ""
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > cfg.max_invalid_frac * max(len(text), 1):
        return None, repairs, "invalid_utf8"
    return text.replace("\ufffd", ""), [*repairs, "invalid_utf8"], ""


class DecodeStep(DocStep):
    name = "decode"

    def __init__(self, out_dir, cfg: DecodeConfig, text_fields: dict[str, str]):
        super().__init__(out_dir)
        self.cfg, self.text_fields = cfg, text_fields

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if doc.raw is not None and len(doc.raw) > self.cfg.max_doc_bytes:
            return Drop("too_long", detail=f"{len(doc.raw)} bytes > decode.max_doc_bytes")
        if doc.kind == "str":
            if "bad_value" in doc.meta:
                return Drop("text_not_string", error=True, detail=doc.meta.pop("bad_value"))
            return self._clean_str(doc, counts)
        text, repairs, reason = decode_bytes(doc.raw, self.cfg)
        if text is None:
            return Drop(reason, error=True)
        for r in repairs:
            counts.notes[f"repair:{r}"] += 1
        if doc.kind == "jsonl":
            field = self.text_fields[doc.source]
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                return Drop("malformed_json", error=True, detail=f"{doc.id}: {e}")
            if not isinstance(obj, dict):
                return Drop("not_an_object", error=True, detail=f"{doc.id}: {type(obj).__name__}")
            if field not in obj:
                return Drop(f"missing_field:{field}", error=True, detail=f"{doc.id}: keys {sorted(obj)[:10]}")
            if not isinstance(obj[field], str):
                return Drop("text_not_string", error=True, detail=f"{doc.id}: {type(obj[field]).__name__}")
            text = obj[field]
            if isinstance(obj.get("lang"), str) and obj["lang"] == "code" and not doc.lang:
                doc.lang = "code"  # the demo code source marks files by type
            doc.raw = None
            doc.text = text
            return self._clean_str(doc, counts)
        doc.raw, doc.text = None, text
        return doc

    def _clean_str(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if len(doc.text) > self.cfg.max_doc_bytes:
            return Drop("too_long", detail=f"{len(doc.text)} chars > decode.max_doc_bytes")
        if "\x00" in doc.text:
            doc.text = doc.text.replace("\x00", "")
            counts.notes["repair:nul"] += 1
        # Lone surrogates (from bad JSON escapes) cannot be written as UTF-8.
        fixed = doc.text.encode("utf-8", errors="replace").decode("utf-8")
        if fixed != doc.text:
            counts.notes["repair:surrogates"] += 1
            doc.text = fixed
        return doc

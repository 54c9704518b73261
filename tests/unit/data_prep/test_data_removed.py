"""Removed-document records: why and where, a hash of the original, and an excerpt with its PII redacted."""

import hashlib

from data_prep.config import PiiConfig
from data_prep.records import Doc, read_jsonl_gz
from data_prep.removed import REMOVED_TEXT_CAP, RemovedWriter, removed_record
from data_prep.steps.base import StepCounts

PHONE, EMAIL = "010-9876-5432", "kim.minsu@example.kr"


def test_record_carries_reason_source_hash_and_excerpt():
    doc = Doc("src:a.jsonl:7", "src", (0, 0, 6), text=f"연락처 {PHONE}", lang="ko")
    rec = removed_record(doc, "quality", "too_short", False, "detail")
    assert rec["id"] == "src:a.jsonl:7" and rec["step"] == "quality" and rec["reason"] == "too_short"
    assert rec["sha256"] == hashlib.sha256(doc.text.encode()).hexdigest() and rec["bytes"] == len(
        doc.text.encode()
    )
    raw = Doc("src:a.jsonl:8", "src", (0, 0, 7), raw=b'{"text": "' + EMAIL.encode(), kind="jsonl")
    rec = removed_record(raw, "decode", "malformed_json", True)
    assert rec["sha256"] == hashlib.sha256(raw.raw).hexdigest() and EMAIL in rec["text"]


def test_writer_redacts_text_and_detail_and_counts(tmp_path):
    counts = StepCounts()
    w = RemovedWriter(tmp_path / "r.jsonl.gz", PiiConfig(), counts)
    long = f"{EMAIL} " + "가" * (REMOVED_TEXT_CAP + 50)
    w.write(Doc("a", "s", (0, 0, 0), text=long, lang="ko"), "quality", "too_long", False, f"see {PHONE}")
    code = Doc("b", "s", (0, 0, 1), text=f"ADDR = '{EMAIL}'", lang="code")
    w.write(code, "quality", "too_short", False)
    w.close()
    big, small = read_jsonl_gz(tmp_path / "r.jsonl.gz")
    assert big["text"].startswith("<|email|> ") and len(big["text"]) == REMOVED_TEXT_CAP and big["truncated"]
    assert big["detail"] == "see <|phone|>" and EMAIL not in small["text"]
    assert counts.notes == {"pii:email": 2, "pii:phone": 1}
    keep = StepCounts()
    w = RemovedWriter(tmp_path / "k.jsonl.gz", PiiConfig(apply_to_code=False), keep)
    w.write(code, "quality", "too_short", False)
    w.close()
    assert next(read_jsonl_gz(tmp_path / "k.jsonl.gz"))["text"] == code.text and not keep.notes

"""Decode and repair: UTF-8, CP949/EUC-KR Korean, invalid bytes, NUL bytes, JSON fields."""

from data_prep.config import DecodeConfig
from data_prep.records import Doc
from data_prep.steps.base import Drop, StepCounts
from data_prep.steps.decode import DecodeStep, decode_bytes

KO = "대한민국의 수도는 서울입니다. 한글은 세종대왕이 만들었습니다."


def test_utf8_passes_unchanged():
    assert decode_bytes(KO.encode("utf-8"), DecodeConfig()) == (KO, [], "")


def test_cp949_and_euc_kr_korean_are_decoded_and_reported():
    for enc in ("cp949", "euc-kr"):
        text, repairs, reason = decode_bytes(KO.encode(enc), DecodeConfig())
        assert text == KO and reason == ""
        assert repairs == ["cp949"]  # EUC-KR is a subset of CP949


def test_cp949_only_syllable_decodes():
    # "똠" exists in CP949 (Unified Hangul Code) but not in EUC-KR.
    raw = ("똠방각하 " + KO).encode("cp949")
    text, repairs, _ = decode_bytes(raw, DecodeConfig())
    assert text.startswith("똠방각하") and repairs == ["cp949"]


def test_invalid_utf8_is_repaired_when_rare_and_rejected_when_common():
    raw = ("hello world, " * 20).encode() + b"\xff" + b" end"
    text, repairs, _ = decode_bytes(raw, DecodeConfig())
    assert "\ufffd" not in text and text.endswith(" end") and repairs == ["invalid_utf8"]
    garbage = bytes(range(128, 256)) * 4
    assert decode_bytes(garbage, DecodeConfig(legacy_encodings=[])) == (None, [], "invalid_utf8")


def test_nul_bytes_removed_or_binary_rejected():
    text, repairs, _ = decode_bytes("한 문장 안에 NUL\x00 바이트가 하나 있습니다.".encode(), DecodeConfig())
    assert text == "한 문장 안에 NUL 바이트가 하나 있습니다." and repairs == ["nul"]
    assert decode_bytes(b"\x00\x01\x00\x02" * 50, DecodeConfig())[2] == "binary"


def _jsonl(line: bytes) -> Doc:
    return Doc("s:f:1", "s", (0, 0, 0), raw=line, kind="jsonl")


def test_decode_step_jsonl_outcomes():
    step = DecodeStep("/tmp/unused", DecodeConfig(max_doc_bytes=1000), {"s": "text"})
    counts = StepCounts()
    ok = step.apply(_jsonl('{"text": "안녕\\u0000하세요"}'.encode()), counts)
    assert isinstance(ok, Doc) and ok.text == "안녕하세요" and counts.notes["repair:nul"] == 1
    cases = {
        b"{not json": "malformed_json",
        b'{"body": "x"}': "missing_field:text",
        b'{"text": 5}': "text_not_string",
        b"[1, 2]": "not_an_object",
    }
    for line, reason in cases.items():
        res = step.apply(_jsonl(line), counts)
        assert isinstance(res, Drop) and res.reason == reason and res.error
    big = step.apply(_jsonl(b'{"text": "' + b"a" * 2000 + b'"}'), counts)
    assert isinstance(big, Drop) and big.reason == "too_long" and not big.error

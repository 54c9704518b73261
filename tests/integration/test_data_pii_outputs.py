"""No personal data in any output of `kmoe data build`, whatever step removed the document.

Documents carrying every PII kind we detect are kept, or removed at decode (malformed JSON, missing field,
non-string text, invalid UTF-8, binary, too long), langid, quality, exact and near dedup and the mix token budget.
After a build that trains its sentencepiece tokenizer, every file under OUT is read (gzip decompressed, shards
decoded with the tokenizer) and no planted value appears anywhere; stats.json counts exactly what was planted;
removed records still say why and where (reason, id naming file and line, sha256, a redacted excerpt).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from data_prep.config import DataConfig
from data_prep.pipeline import build
from data_prep.records import read_jsonl_gz
from kmoe.configtree import from_dict

# Planted values, each used once per document it appears in (so counts are exact). Checksums are valid.
V = {
    "rrn": ["850315-2102344", "920704-1567810", "010203-4123453", "770911-1405289"],
    "brn": ["220-81-62517", "109-81-12345", "103-86-40213"],
    "card": ["4111-1111-1111-1111", "5555 5555 5555 4444", "6011111111111117", "3530 1113 3330 0000"],
    "phone": ["010-9876-5432", "02-123-4567", "031 987 6543", "010-3333-4444", "+82 10 2222 3333",
              "070-1234-5678", "010-5555-6666"],
    "email": ["kim.minsu@example.kr", "lee.jiwon@example.co.kr", "tanaka.taro@example.jp", "j.smith@example.com",
              "park.sora@example.kr", "choi@example.org", "han.yuna@example.net", "yoon@example.kr",
              "oh.jisu@example.kr"],
    "ip": ["121.134.56.78", "211.234.56.78", "175.223.10.45", "59.10.200.31", "58.229.10.11", "203.252.17.9"],
}  # fmt: skip
KO_BODY = (
    "서울은 대한민국의 수도이며 한강이 도시 한가운데를 흐릅니다. 봄이면 여의도와 남산에 벚꽃이 피어 많은 사람들이 "
    "꽃구경을 나옵니다. 지하철이 잘 되어 있어 어디든 쉽게 갈 수 있습니다."
)
KO_KEPT = (
    f"고객 정보 안내입니다. 주민등록번호는 {V['rrn'][0]} 이고 휴대전화는 {V['phone'][0]} 입니다. "
    f"이메일 {V['email'][0]} 로 연락 주시면 됩니다. 결제 카드 번호는 {V['card'][0]} 이며 사업자등록번호는 "
    f"{V['brn'][0]} 입니다. 접속 기록의 주소는 {V['ip'][0]} 으로 남아 있습니다. " + KO_BODY
)
# After redaction the same text as KO_KEPT except two particles: a near duplicate, with its own values.
KO_NEAR = (
    KO_KEPT.replace(V["rrn"][0], V["rrn"][1])
    .replace(V["phone"][0], V["phone"][1])
    .replace(V["email"][0], V["email"][1])
    .replace(V["card"][0], V["card"][1])
    .replace(V["brn"][0], V["brn"][1])
    .replace(V["ip"][0], V["ip"][1])
    .replace("수도이며", "수도이고")
    .replace("나옵니다", "나온다")
)
EN_KEPT = (
    f"The library opens at nine in the morning. Write to {V['email'][3]} or call {V['phone'][4]} to book a room; "
    f"the booking server at {V['ip'][2]} keeps the request. Visitors can borrow up to five books at a time."
)
JA_KEPT = (
    "京都には古い寺や神社が数多く残っていて、春の桜と秋の紅葉の季節には多くの観光客が訪れます。"
    f"予約は {V['email'][2]} までご連絡ください。カード {V['card'][3]} で支払いました。"
)
# Digits are single tokens (split_digits), so this document alone exceeds the ja budget whatever the vocabulary.
JA_OVER_BUDGET = (
    "味噌汁は日本の家庭料理の基本で、だしに味噌を溶かし、豆腐やわかめ、ねぎなどの具を入れて作ります。"
    f"問い合わせは {V['email'][6]} へ。接続元 {V['ip'][4]} を記録しました。注文番号は {3**700} です。"
)
# A document never takes more tokens than its UTF-8 bytes (byte fallback) plus dummy prefix, BOS and EOS.
JA_BUDGET = len(JA_KEPT.encode()) + 3
DUP_LINES = f"카드 번호 {V['card'][2]} 를 확인해 주세요.\n" * 6 + f"주민번호 {V['rrn'][2]} 입니다."
TOO_SHORT = f"전화 {V['phone'][2]} 주세요."
FRENCH = (
    "La bibliothèque ouvre à neuf heures du matin et ferme à huit heures du soir. Écrivez à "
    f"{V['email'][4]} ou appelez le {V['phone'][3]} pour réserver une salle de lecture."
)
TOO_LONG = (
    f"연락처 {V['email'][5]} 사업자 {V['brn'][2]}. " + "가나다라마바사 " * 700
)  # > decode.max_doc_bytes
CP949_DOC = f"부산은 바다와 산이 어우러진 항구 도시입니다. 해운대 해수욕장이 유명합니다. 문의 전화는 {V['phone'][5]} 입니다."


def _lines() -> list[bytes]:
    def j(obj) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode()

    return [
        j({"text": KO_KEPT}),
        j({"text": EN_KEPT}),
        j({"text": JA_KEPT}),
        j({"text": JA_OVER_BUDGET}),
        j({"text": EN_KEPT}),  # exact duplicate (its values are planted twice)
        j({"text": KO_NEAR}),  # near duplicate
        j({"text": DUP_LINES}),  # quality: dup_lines
        j({"text": TOO_SHORT}),  # quality: too_short
        j({"text": FRENCH}),  # langid: lang:fr
        j({"text": TOO_LONG}),  # decode: too_long
        f'{{"text": "연락처 {V["email"][7]} 주민 {V["rrn"][3]}'.encode(),  # decode: malformed_json
        j({"body": f"메일 {V['email'][8]} 로 보내 주세요."}),  # decode: missing_field:text
        j({"text": [f"phone {V['phone'][6]}"]}),  # decode: text_not_string
        b'{"text": "' + b"\xff\xfe" * 40 + f" host {V['ip'][3]} ".encode() + b'"}',  # decode: invalid_utf8
        j({"text": " \u200b \t "}),  # normalize: empty (carries nothing, removed all the same)
    ]


def planted_counts() -> Counter:
    """Occurrences of every value in the inputs, per kind (what stats.json must report)."""
    blobs = [*_lines(), CP949_DOC.encode("cp949"), BINARY]
    return Counter({k: sum(b.count(v.encode()) for b in blobs for v in vals) for k, vals in V.items()})


BINARY = b"\x00" * 200 + f"binary {V['ip'][5]} end".encode()  # decode: binary (NUL bytes)


def write_inputs(root: Path) -> None:
    (root / "jsonl").mkdir(parents=True)
    (root / "jsonl" / "docs.jsonl").write_bytes(b"\n".join(_lines()) + b"\n")
    (root / "text").mkdir()
    (root / "text" / "busan_cp949.txt").write_bytes(CP949_DOC.encode("cp949"))
    (root / "text" / "blob.txt").write_bytes(BINARY)


def config(root: Path) -> DataConfig:
    return from_dict(
        DataConfig,
        {
            "sources": [
                {"name": "docs", "type": "jsonl", "path": str(root / "jsonl")},
                {"name": "notes", "type": "text", "path": str(root / "text"), "lang": "ko"},
            ],
            "decode": {"max_doc_bytes": 4000},
            "quality": {"min_chars": 30},
            "mix": {"weights": {"ko": 0.5, "en": 0.3, "ja": 0.2}, "max_tokens": {"ja": JA_BUDGET}},
            "tokenizer": {"train": {"vocab_size": 800, "sample_chars": 20_000, "num_reserved": 2}},
            "executor": {"tasks": 2, "workers": 1},
        },
    )


def all_output_text(out: Path) -> dict[str, bytes]:
    """Every file under OUT as bytes, gzip files decompressed, plus the shards decoded with the tokenizer."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.tokenizer import load_tokenizer

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[str(path.relative_to(out))] = gzip.decompress(data) if path.suffix == ".gz" else data
    tok = load_tokenizer(out / "tokenizer")
    for idx in sorted((out / "shards").glob("*.idx")):
        ds = IndexedDataset(str(idx.with_suffix("")))
        text = "\n".join(tok.decode(ds[i].tolist()) for i in range(len(ds)))
        files[f"decoded:{idx.stem}"] = text.encode()
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("pii")
    write_inputs(root / "in")
    build(config(root / "in"), root / "out")
    return root / "out"


def test_every_step_removed_something_with_pii(built):
    removed = Counter(
        f"{r['step']}:{r['reason']}"
        for f in (built / "corpus" / "removed").rglob("*.jsonl.gz")
        for r in read_jsonl_gz(f)
    )
    for key in (
        "decode:too_long", "decode:malformed_json", "decode:missing_field:text", "decode:text_not_string",
        "decode:invalid_utf8", "decode:binary", "normalize:empty", "langid:lang:fr", "quality:dup_lines",
        "quality:too_short", "dedup:exact_duplicate", "dedup:near_duplicate", "mix:over_token_budget",
    ):  # fmt: skip
        assert removed[key] == 1, (key, removed)


def test_no_planted_value_in_any_output_file(built):
    files = all_output_text(built)
    assert any(name.startswith("decoded:") for name in files) and any("logs/" in n for n in files)
    leaks = [
        (name, v) for name, data in files.items() for vals in V.values() for v in vals if v.encode() in data
    ]
    assert leaks == []


def test_stats_count_exactly_what_was_planted(built):
    stats = json.loads((built / "stats.json").read_text())
    assert stats["pii"] == dict(planted_counts())
    # Removed records are redacted where they are written: the steps before pii count their own replacements.
    by_step = {
        s: sum(v for k, v in d["notes"].items() if k.startswith("pii:")) for s, d in stats["steps"].items()
    }
    assert by_step["decode"] > 0 and by_step["langid"] > 0 and by_step["quality"] > 0 and by_step["pii"] > 0


def test_removed_records_still_say_why_and_where(built):
    recs = [r for f in (built / "corpus" / "removed").rglob("*.jsonl.gz") for r in read_jsonl_gz(f)]
    dup = next(r for r in recs if r["reason"] == "dup_lines")
    assert dup["id"] == "docs:docs.jsonl:7" and dup["source"] == "docs" and dup["step"] == "quality"
    assert dup["sha256"] == hashlib.sha256(DUP_LINES.encode()).hexdigest()
    assert "<|card|>" in dup["text"] and "<|rrn|>" in dup["text"] and "카드 번호" in dup["text"]
    broken = next(r for r in recs if r["reason"] == "malformed_json")
    assert broken["error"] and "<|email|>" in broken["text"] and broken["id"] == "docs:docs.jsonl:11"
    assert all(r["reason"] and r["id"] and len(r["sha256"]) == 64 for r in recs)


def test_user_error_in_a_stage_is_one_line_and_its_log_holds_no_values(tmp_path, capfd):
    from kmoe.cli import main

    write_inputs(tmp_path / "in")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"sources:\n  - {{name: docs, type: jsonl, path: {tmp_path / 'in' / 'jsonl'}}}\n"
        "quality: {min_chars: 30}\n"
        "tokenizer: {train: {vocab_size: 400, sample_chars: 20000, num_reserved: 2}}\n"
        "executor: {tasks: 1, workers: 1}\n"
    )
    assert main(["data", "build", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("kmoe: error:"))
    assert "stage tokenizer: tokenizer.vocab_size: 400 is smaller than the" in line
    assert "characters to reach character_coverage 0.9995" in line and "logs/tokenizer/logs" in line
    log = next((tmp_path / "out" / "work" / "logs" / "tokenizer" / "logs").glob("task_*.log")).read_text()
    assert "Traceback" in log and "check_vocab_fits" in log  # the trace is kept in the stage's log ...
    assert "도시" not in log and "<|email|>" not in log  # ... without the values of variables (document text)

"""`kmoe data build` end to end on a bad-input set written here: every document accounted for with a
reason, PII replaced, duplicates removed, shards load in megatron-core GPTDataset with a 3-way blend,
byte-identical reruns, and one changed document changes the root hash."""

from __future__ import annotations

import collections
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from byte_tokenizer import ByteTokenizer

from data_prep.config import DataConfig
from data_prep.pipeline import build
from kmoe.configtree import ConfigError, from_dict

KO = [
    "서울은 대한민국의 수도이며 한강이 도시 한가운데를 흐릅니다. 봄이면 여의도와 남산에 벚꽃이 피어 많은 사람들이 "
    "꽃구경을 나옵니다. 지하철이 잘 되어 있어 어디든 쉽게 갈 수 있습니다.",
    "김치는 배추와 무에 고춧가루, 마늘, 젓갈을 넣어 담그는 한국의 대표 음식입니다. 겨울이 오기 전에 온 가족이 모여 "
    "김장을 하는 풍습이 지금도 이어지고 있습니다.",
    "한글은 세종대왕이 백성을 위해 만든 글자로, 자음과 모음을 모아 한 음절을 씁니다. 배우기 쉬워서 누구나 며칠이면 "
    "읽고 쓸 수 있다고 알려져 있습니다.",
    "제주도는 화산섬으로 한라산과 오름, 바닷가의 검은 돌이 유명합니다. 여름에는 해수욕을 즐기고 겨울에는 귤을 따는 "
    "체험을 할 수 있어 사계절 내내 여행객이 많습니다.",
]
EN = [
    "The library opens at nine in the morning and closes at eight in the evening. Visitors can borrow up to "
    "five books at a time and return them at any branch in the city.",
    "Bread dough needs time to rise in a warm place. After the first rise, fold it gently, shape the loaf and "
    "let it rest again before baking it in a hot oven until the crust is brown.",
    "Trains leave the central station every fifteen minutes during the day. Tickets can be bought from the "
    "machines on the platform or with a card at the gate.",
]
JA = [
    "京都には古い寺や神社が数多く残っていて、春の桜と秋の紅葉の季節には国内外から多くの観光客が訪れます。"
    "町を歩くだけでも歴史を感じることができます。",
    "味噌汁は日本の家庭料理の基本で、だしに味噌を溶かし、豆腐やわかめ、ねぎなどの具を入れて作ります。"
    "朝ご飯に欠かせないという人も多いです。",
    "新幹線は東京と大阪の間を約二時間半で結んでいます。車内は静かで揺れも少なく、窓からは天気の良い日に"
    "富士山を見ることができます。",
]


def make_rrn(front: str, gender: str, serial: str) -> str:
    digits = [int(c) for c in front + gender + serial]
    check = (11 - sum(d * w for d, w in zip(digits, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5))) % 11) % 10
    return f"{front}-{gender}{serial}{check}"


RRN = make_rrn("850315", "2", "10234")
PII_DOC = (
    f"고객 정보 안내입니다. 주민등록번호는 {RRN} 이고 휴대전화는 010-9876-5432 입니다. 이메일 kim.minsu@example.kr "
    "로 연락 주시면 됩니다. 결제 카드 번호는 4111-1111-1111-1111 이며 사업자등록번호는 220-81-62517 입니다. "
    "접속 기록의 주소는 121.134.56.78 으로 남아 있습니다."
)
NEAR_DUP = KO[0].replace("수도이며", "수도이고").replace("나옵니다", "나온다")  # char-5 Jaccard 0.75
CP949_DOC = "부산은 바다와 산이 어우러진 항구 도시입니다. 해운대 해수욕장과 자갈치 시장이 유명하고, 가을에는 영화제가 열립니다."
NUL_DOC = "대전은 과학의 도시로 불리며 연구소와 대학이 많이 모여 있습니다.\x00 엑스포 공원에서는 과학 전시를 볼 수 있습니다."

BAD_BYTE_DOC = (
    "The community garden has twenty small plots. Each family waters its own vegetables, and on Saturdays "
    "everyone shares tools, seeds and advice about the weather."
)
EXPECTED_ERRORS = {"decode:malformed_json": 1, "decode:missing_field:text": 1, "decode:invalid_utf8": 2}
EXPECTED_REMOVED = {
    "decode:too_long": 1,
    "normalize:empty": 1,
    "dedup:exact_duplicate": 1,
    "dedup:near_duplicate": 1,
}


def write_inputs(root: Path, big_mb: int = 50) -> None:
    j = root / "jsonl"
    j.mkdir(parents=True)
    lines = [json.dumps({"text": t}, ensure_ascii=False).encode() for t in [*KO, *EN, *JA, PII_DOC]]
    lines += [
        b'{"text": "broken json line',  # malformed
        json.dumps({"body": KO[1]}, ensure_ascii=False).encode(),  # missing text field
        json.dumps({"text": KO[1]}, ensure_ascii=False).encode(),  # exact duplicate of an earlier doc
        json.dumps({"text": NEAR_DUP}, ensure_ascii=False).encode(),  # near duplicate (particles changed)
        b'{"text": "' + b"\xff\xfe\xfd" * 40 + b'"}',  # invalid UTF-8 beyond repair
        json.dumps({"text": BAD_BYTE_DOC})
        .encode()
        .replace(b"garden", b"gar\xffden"),  # one stray byte: repaired
    ]
    (j / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (j / "empty.jsonl").write_bytes(b"")
    with open(j / "big.jsonl", "wb") as f:  # one 50 MB line
        f.write(b'{"text": "')
        chunk = ("가나다라마바사 " * 1000).encode()
        for _ in range(big_mb * 1_000_000 // len(chunk) + 1):
            f.write(chunk)
        f.write(b'"}\n')
    t = root / "text"
    t.mkdir()
    (t / "busan_cp949.txt").write_bytes(CP949_DOC.encode("cp949"))
    (t / "daejeon_nul.txt").write_bytes(NUL_DOC.encode("utf-8"))
    (t / "garbage.txt").write_bytes(b"abc\xff\xfe" * 100)
    (t / "empty.txt").write_bytes(b"")


def config(root: Path, workers: int = 1) -> DataConfig:
    return from_dict(
        DataConfig,
        {
            "sources": [
                {"name": "docs", "type": "jsonl", "path": str(root / "jsonl")},
                {"name": "notes", "type": "text", "path": str(root / "text"), "lang": "ko"},
            ],
            "mix": {"weights": {"ko": 0.5, "en": 0.3, "ja": 0.2}},
            "executor": {"tasks": 2, "workers": workers},
        },
    )


def read_all(out: Path, part: str) -> list[dict]:
    return [
        json.loads(ln)
        for f in sorted((out / "corpus" / part).rglob("*.jsonl.gz"))
        for ln in gzip.open(f, "rt")
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_inputs(root / "in")
    out_a, out_b = root / "out_a", root / "out_b"
    manifest_a = build(config(root / "in", workers=2), out_a, tokenizer=ByteTokenizer())
    manifest_b = build(config(root / "in", workers=1), out_b, tokenizer=ByteTokenizer())
    return root, out_a, manifest_a, out_b, manifest_b


def test_every_document_is_accounted_for(built):
    _, out, manifest, _, _ = built
    stats = json.loads((out / "stats.json").read_text())
    o = stats["overall"]
    assert o["errors"] == EXPECTED_ERRORS
    assert o["removed"] == EXPECTED_REMOVED
    n_inputs = len(KO) + len(EN) + len(JA) + 1 + 6 + 1 + 4  # docs.jsonl + big.jsonl + text files
    assert o["in"] == n_inputs
    assert o["kept"] == n_inputs - sum(EXPECTED_ERRORS.values()) - sum(EXPECTED_REMOVED.values())
    kept, removed = read_all(out, "kept"), read_all(out, "removed")
    assert len(kept) == o["kept"] == sum(c["docs"] for c in manifest["counts"].values())
    assert collections.Counter(f"{r['step']}:{r['reason']}" for r in removed) == {
        **EXPECTED_ERRORS,
        **EXPECTED_REMOVED,
    }
    assert all(r["reason"] for r in removed)
    ids = [r["id"] for r in kept + removed]
    assert len(ids) == len(set(ids)) == n_inputs  # nothing lost, nothing counted twice
    assert stats["steps"]["read"]["notes"]["empty_files"] == 1  # empty.jsonl (empty.txt is an empty doc)
    assert stats["steps"]["decode"]["notes"] == {"repair:cp949": 1, "repair:invalid_utf8": 1, "repair:nul": 1}
    big = next(r for r in removed if r["reason"] == "too_long")
    assert big["id"] == "docs:big.jsonl:1" and big["truncated"]


def test_pii_replaced_and_duplicates_removed(built):
    _, out, _, _, _ = built
    kept = {r["id"]: r for r in read_all(out, "kept")}
    pii = next(r for r in kept.values() if "고객 정보" in r["text"])
    for placeholder in ("<|rrn|>", "<|phone|>", "<|email|>", "<|card|>", "<|brn|>", "<|ip|>"):
        assert placeholder in pii["text"]
    text = "\n".join(r["text"] for r in kept.values())
    for raw in (
        RRN,
        "010-9876-5432",
        "kim.minsu@example.kr",
        "4111-1111-1111-1111",
        "220-81-62517",
        "121.134.56.78",
    ):
        assert raw not in text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pii"] == {"brn": 1, "card": 1, "email": 1, "ip": 1, "phone": 1, "rrn": 1}
    assert sum(KO[1] == r["text"] for r in kept.values()) == 1
    assert not any(r["text"] == NEAR_DUP for r in kept.values())
    assert any(r["text"] == CP949_DOC for r in kept.values())
    assert any(r["text"] == NUL_DOC.replace("\x00", "") for r in kept.values())
    assert any(r["text"] == BAD_BYTE_DOC for r in kept.values())
    assert {r["lang"] for r in kept.values()} == {"ko", "en", "ja"}


def test_shards_hold_every_kept_doc_with_eod(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, out, manifest, _, _ = built
    tok = ByteTokenizer()
    for lang in ("ko", "en", "ja"):
        shard = shard_docs(out, lang)
        docs = [r["text"] for r in read_all(out, "kept") if r["lang"] == lang]
        assert len(shard) == len(docs) == manifest["counts"][lang]["docs"]
        assert [tok.decode(d[:-1].tolist()) for d in shard] == docs  # kept order, across the parts
        assert all(int(d[-1]) == tok.eos_id and int(d[0]) == tok.bos_id for d in shard)
        assert shard[0].dtype == np.uint16
    parts = manifest["counts"]["ko"]["parts"]  # 2 tasks: 2 parts, each in the manifest with its hashes
    assert [p["prefix"] for p in parts] == ["shards/ko-00000", "shards/ko-00001"]
    assert all(manifest["files"][p["prefix"] + ".idx"] == p["sha256"]["idx"] for p in parts)
    assert IndexedDataset(str(out / parts[0]["prefix"])) is not None


def shard_docs(out: Path, lang: str) -> list:
    """A language's documents, its parts read in part order."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_prep.parts import group_prefixes

    # copies: a document is a view of its memory map, which closes with the IndexedDataset
    return [np.array(ds[i]) for pre in group_prefixes(out / "shards")[lang] for ds in [IndexedDataset(pre)] for i in range(len(ds))]  # fmt: skip


def test_shards_load_in_gpt_dataset_with_3_way_blend(built):
    from data_prep.blend import gpt_datasets

    _, out, manifest, _, _ = built
    prefixes = manifest["blend"]["prefixes"]
    assert prefixes == [f"shards/{lang}-{p:05d}" for lang in ("en", "ja", "ko") for p in (0, 1)]
    train, _, _ = gpt_datasets(out, seq_len=32, num_samples=[200, 0, 0], split="100,0,0")
    counts = collections.Counter(prefixes[int(train.dataset_index[i])][7:9] for i in range(200))
    assert counts == {"en": 60, "ja": 40, "ko": 100}  # en 0.3, ja 0.2, ko 0.5 over each language's parts
    sample = train[0]
    assert sample["tokens"].shape[0] == 32 and int(sample["tokens"].max()) < ByteTokenizer.vocab_size


def test_rerun_is_byte_identical_whatever_the_worker_count(built):
    _, out_a, manifest_a, out_b, manifest_b = built
    assert manifest_a["root_hash"] == manifest_b["root_hash"]
    shards = sorted(p.name for p in (out_a / "shards").glob("*.[bi][id][nx]"))
    assert shards == sorted(p.name for p in (out_b / "shards").glob("*.[bi][id][nx]")) and len(shards) == 12
    for name in shards:
        assert (out_a / "shards" / name).read_bytes() == (out_b / "shards" / name).read_bytes()
    assert manifest_a["files"] == manifest_b["files"]


def test_tokens_per_language_do_not_depend_on_the_task_count(built):
    """3 shard tasks instead of 2: other parts, the same documents in the same order per language."""
    root, out_a, manifest_a, _, _ = built
    cfg = config(root / "in")
    cfg.executor.tasks = 3
    manifest = build(cfg, root / "out_3", tokenizer=ByteTokenizer())
    for lang in ("ko", "en", "ja"):
        assert len(manifest["counts"][lang]["parts"]) == 3
        assert [d.tolist() for d in shard_docs(root / "out_3", lang)] == [
            d.tolist() for d in shard_docs(out_a, lang)
        ]
        drop = ("parts",)
        assert {k: v for k, v in manifest["counts"][lang].items() if k not in drop} == {
            k: v for k, v in manifest_a["counts"][lang].items() if k not in drop
        }
    assert json.loads((root / "out_3" / "stats.json").read_text()) == json.loads(
        (out_a / "stats.json").read_text()
    )


def test_changing_one_document_changes_the_root(built):
    root, _, manifest_a, _, _ = built
    changed = root / "in_changed"
    shutil.copytree(root / "in", changed)
    docs = changed / "jsonl" / "docs.jsonl"
    docs.write_bytes(docs.read_bytes().replace(b"opens at nine", b"opens at ten"))
    manifest_c = build(config(changed), root / "out_c", tokenizer=ByteTokenizer())
    assert manifest_c["root_hash"] != manifest_a["root_hash"]
    shard_files = lambda m, lang: [v for k, v in m["files"].items() if k.startswith(f"shards/{lang}-")]  # noqa: E731
    assert shard_files(manifest_c, "en") != shard_files(manifest_a, "en")
    assert shard_files(manifest_c, "ko") == shard_files(manifest_a, "ko")


def test_relaunch_skips_finished_tasks_and_refuses_another_config(built):
    root, out, manifest, _, _ = built
    before = {p: p.stat().st_mtime_ns for p in (out / "work" / "text").glob("*.jsonl.gz")}
    again = build(config(root / "in"), out, tokenizer=ByteTokenizer())
    assert again["root_hash"] == manifest["root_hash"]
    assert {p: p.stat().st_mtime_ns for p in (out / "work" / "text").glob("*.jsonl.gz")} == before
    other = config(root / "in")
    other.dedup.threshold = 0.9
    with pytest.raises(ConfigError, match="different config"):
        build(other, out, tokenizer=ByteTokenizer())


def test_kmoe_data_stats_and_verify(built, capsys):
    from kmoe.cli import main

    _, out, manifest, _, _ = built
    assert main(["data", "stats", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "identity: 22 in = 14 kept + 4 removed + 4 errors" in text
    assert manifest["root_hash"] in text and "every file matches" in text


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    from kmoe.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"content": "본문입니다."}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"sources: [{{name: a, type: jsonl, path: {tmp_path / 'in'}}}]\ntokenizer: {{path: {tmp_path}}}\n"
    )
    assert main(["data", "build", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sources[0].text_field: 'text' not in the first record of" in err and "a.jsonl" in err
    assert not (tmp_path / "out" / "corpus").exists()
    assert (
        main(
            [
                "data",
                "build",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "o2"),
                "--set",
                "normalize.form=NFKC",
            ]
        )
        == 2
    )
    assert "normalize.form: 'NFKC' is not one of 'NFC'" in capsys.readouterr().err


def test_relaunch_after_a_crash_redoes_only_the_unfinished_task(built):
    root, _, manifest_a, out, _ = built
    logs = out / "work" / "logs"
    # As if task 1 of the text stage died: no marker, no output, and no later stage ever finished.
    (logs / "text" / "completions" / "00001").unlink()
    (out / "work" / "text" / "00001.jsonl.gz").unlink()
    for stage in [p.name for p in logs.iterdir() if p.name != "text"]:
        for marker in (logs / stage / "completions").iterdir():
            marker.unlink()
    kept_task0 = (out / "work" / "text" / "00000.jsonl.gz").stat().st_mtime_ns
    again = build(config(root / "in"), out, tokenizer=ByteTokenizer())
    assert (out / "work" / "text" / "00000.jsonl.gz").stat().st_mtime_ns == kept_task0
    assert (out / "work" / "text" / "00001.jsonl.gz").is_file()
    assert again["root_hash"] == manifest_a["root_hash"]

"""Token shards in parts: the document split does not depend on the task count, the manifest lists every part
with its hash, and readers group the parts of a language (and still read one-part shards)."""

import json
from collections import Counter

import numpy as np
import pytest
from byte_tokenizer import ByteTokenizer

from data_prep.manifest import build_manifest, verify_manifest
from data_prep.parts import group_prefixes, language_totals, part_range, split_weight
from data_prep.records import JsonlGzWriter
from data_prep.shards import ShardStep

TEXTS = {
    "ko": [f"문서 {i}번은 조사가 붙은 한국어 문장입니다." * (1 + i % 3) for i in range(7)],
    "en": [f"English document number {i}." for i in range(2)],
}


def _kept(out):
    """Kept corpus in two files per language (as the dedup stage writes it: shards of a few documents)."""
    for lang, texts in TEXTS.items():
        for f, chunk in enumerate((texts[:4], texts[4:])):
            w = JsonlGzWriter(out / "corpus" / "kept" / lang / f"{f:05d}.jsonl.gz")
            for i, t in enumerate(chunk):
                w.write({"id": f"{lang}{f}-{i}", "text": t, "lang": lang, "source": f"s{i % 2}"})
            w.close()


def _build(out, tasks, max_tokens=None):
    _kept(out)
    step = ShardStep(out, ["ko", "en"], ByteTokenizer(), max_tokens or {})
    for rank in range(tasks):
        step.run(rank=rank, world_size=tasks)
    stems = sorted((out / "work" / "shard_totals").glob("*.json"))
    return language_totals({p.stem: json.loads(p.read_text()) for p in stems})


def _docs(out, lang):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return [ds[i].tolist() for pre in group_prefixes(out / "shards")[lang] for ds in [IndexedDataset(pre)]
            for i in range(len(ds))]  # fmt: skip


def test_part_ranges_cover_every_document_once():
    for n in (0, 1, 5, 17):
        for parts in (1, 3, 8):
            ranges = [part_range(n, p, parts) for p in range(parts)]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))


def test_parts_concatenate_to_the_one_part_shard(tmp_path):
    one, three = _build(tmp_path / "t1", 1), _build(tmp_path / "t3", 3)
    for lang in TEXTS:
        assert _docs(tmp_path / "t3", lang) == _docs(tmp_path / "t1", lang)  # same documents, same order
        assert {k: one[lang][k] for k in ("docs", "tokens", "by_source")} == {
            k: three[lang][k] for k in ("docs", "tokens", "by_source")
        }
    assert [p["prefix"] for p in three["ko"]["parts"]] == [
        "shards/ko-00000",
        "shards/ko-00001",
        "shards/ko-00002",
    ]
    assert [p["docs"] for p in three["ko"]["parts"]] == [2, 2, 3]  # contiguous, spanning the two kept files
    assert [p["prefix"] for p in three["en"]["parts"]] == [
        "shards/en-00001",
        "shards/en-00002",
    ]  # 2 docs, 3 tasks
    assert not list((tmp_path / "t3" / "shards").glob("*.tmp"))


def test_budgeted_language_is_one_part_written_by_task_zero(tmp_path):
    totals = {t: _build(tmp_path / str(t), t, {"ko": 150}) for t in (1, 4)}
    assert totals[1]["ko"] == totals[4]["ko"] and len(totals[4]["ko"]["parts"]) == 1
    assert totals[4]["ko"]["tokens"] <= 150 < sum(len(t.encode()) + 2 for t in TEXTS["ko"])
    mix = [
        json.loads(p.read_text())
        for p in sorted((tmp_path / "4" / "work" / "stats" / "mix").glob("ko*.json"))
    ]
    assert sum(m["in"] for m in mix) == 7 and sum(m["removed"].get("over_token_budget", 0) for m in mix) > 0


def test_manifest_lists_parts_with_hashes_and_splits_the_weight(tmp_path):
    totals = _build(tmp_path, 3)
    (tmp_path / "stats.json").write_text("{}\n")
    m = build_manifest(tmp_path, totals, {"digest": "ab" * 32}, "cd" * 32, {"ko": 0.75, "en": 0.25})
    parts = m["counts"]["ko"]["parts"]
    assert all(p["sha256"]["bin"] == m["files"][p["prefix"] + ".bin"] for p in parts)
    assert m["blend"]["prefixes"] == ["shards/en-00001", "shards/en-00002"] + [p["prefix"] for p in parts]
    ko_w = m["blend"]["weights"][2:]
    assert sum(ko_w) == pytest.approx(0.75)
    assert np.allclose(np.array(ko_w) / 0.75, [p["tokens"] / m["counts"]["ko"]["tokens"] for p in parts])
    assert verify_manifest(tmp_path, m) == []
    (tmp_path / parts[1]["prefix"]).with_suffix(".bin").write_bytes(b"x")
    assert verify_manifest(tmp_path, m) == ["shards/ko-00001.bin"]


def test_token_multiset_independent_of_task_count(tmp_path):
    bags = []
    for tasks in (1, 5):
        _build(tmp_path / str(tasks), tasks)
        bags.append(Counter(t for d in _docs(tmp_path / str(tasks), "ko") for t in d))
    assert bags[0] == bags[1]


def test_kept_index_gives_the_same_parts_as_counting(tmp_path, monkeypatch):
    import data_prep.parts
    from data_prep.records import write_json

    counted = _build(tmp_path / "counted", 3)
    for lang, texts in TEXTS.items():  # what a kept-corpus writer would record: records per file
        write_json(tmp_path / "indexed" / "work" / "kept_index" / lang / "00000.json",
                   {"00000.jsonl.gz": len(texts[:4]), "00001.jsonl.gz": len(texts[4:])})  # fmt: skip
    monkeypatch.setattr(data_prep.parts, "count_lines", lambda path: pytest.fail(f"counted {path}"))
    assert _build(tmp_path / "indexed", 3) == counted


def test_group_prefixes_reads_old_and_new_layouts(tmp_path):
    for name in ("ko", "en-00001", "en-00000", "notes"):
        for ext in ("bin", "idx"):
            (tmp_path / f"{name}.{ext}").write_bytes(b"")
    (tmp_path / "README.idx").write_bytes(b"")  # not a shard name: ignored
    got = group_prefixes(tmp_path)
    assert got == {
        "en": [str(tmp_path / "en-00000"), str(tmp_path / "en-00001")],
        "ko": [str(tmp_path / "ko")],
        "notes": [str(tmp_path / "notes")],
    }
    (tmp_path / "ko-00000.idx").write_bytes(b"")
    (tmp_path / "ko-00000.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="both ko.idx and ko-NNNNN.idx"):
        group_prefixes(tmp_path)
    (tmp_path / "en-00000.bin").unlink()
    with pytest.raises(ValueError, match="en-00000.bin missing"):
        group_prefixes(tmp_path)


def test_split_weight_by_tokens():
    assert split_weight(0.4, [30, 10]) == pytest.approx([0.3, 0.1])
    assert split_weight(0.4, [0, 0]) == pytest.approx([0.2, 0.2])

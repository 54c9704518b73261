"""Shard writer (EOD, token budget, dtype), manifest root hash, accounting identities, config checks."""

import json

import pytest
from byte_tokenizer import ByteTokenizer

from data_prep.accounting import AccountingError, check
from data_prep.config import DataConfig, load_data_config
from data_prep.manifest import build_manifest, verify_manifest
from data_prep.records import JsonlGzWriter
from data_prep.shards import token_dtype, write_language_shard
from kmoe.configtree import ConfigError, from_dict


def _kept(out, lang, texts):
    w = JsonlGzWriter(out / "corpus" / "kept" / lang / "00000.jsonl.gz")
    for i, t in enumerate(texts):
        w.write({"id": f"d{i}", "text": t, "lang": lang, "source": "s"})
    w.close()


def test_shard_eod_and_token_budget(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _kept(tmp_path, "ko", ["가나", "다라마", "바"])  # 6, 9, 3 bytes (+BOS +EOD each)
    counts, totals = write_language_shard(tmp_path, "ko", ByteTokenizer(), max_tokens=13)
    assert counts.kept == 2 and counts.removed == {"over_token_budget": 1} and totals["tokens"] == 13
    ds = IndexedDataset(str(tmp_path / "shards" / "ko-00000"))
    assert len(ds) == 2 and ds[0].tolist() == [256, *"가나".encode(), 257]
    assert token_dtype(259).__name__ == "uint16" and token_dtype(100_000).__name__ == "int32"


def test_manifest_root_changes_with_any_file(tmp_path):
    _kept(tmp_path, "ko", ["가나다"])
    (tmp_path / "stats.json").write_text("{}\n")
    totals = {"ko": {"docs": 1, "tokens": 10, "dtype": "uint16", "by_source": {}}}
    tok = {"digest": "ab" * 32}
    m1 = build_manifest(tmp_path, totals, tok, "cd" * 32, {"ko": 1.0})
    assert m1 == build_manifest(tmp_path, totals, tok, "cd" * 32, {"ko": 1.0})
    assert verify_manifest(tmp_path, m1) == []
    _kept(tmp_path, "ko", ["가나라"])
    assert verify_manifest(tmp_path, m1) == ["corpus/kept/ko/00000.jsonl.gz"]
    m2 = build_manifest(tmp_path, totals, tok, "cd" * 32, {"ko": 1.0})
    assert m2["root_hash"] != m1["root_hash"]
    assert build_manifest(tmp_path, totals, tok, "ef" * 32, {"ko": 1.0})["root_hash"] != m2["root_hash"]


def test_accounting_identities():
    step = {"in": 5, "kept": 3, "removed": {"x": 1}, "errors": {"y": 1}, "notes": {}}
    ok = {"steps": {"read": step}, "overall": {"in": 5, "kept": 3, "removed": {"x": 1}, "errors": {"y": 1}}}
    check(ok)
    lost = json.loads(json.dumps(ok))
    lost["steps"]["read"]["kept"] = 2
    with pytest.raises(AccountingError, match="step read"):
        check(lost)
    chain = json.loads(json.dumps(ok))
    chain["steps"]["decode"] = {**step, "in": 4, "kept": 2}
    with pytest.raises(AccountingError, match="decode: in 4 != kept 3"):
        check(chain)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'dedup.bandz'"):
        from_dict(DataConfig, {"sources": [], "dedup": {"bandz": 3}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"sources: [{{name: a, type: text, path: {tmp_path}}}]\ndedup: {{num_perm: 100, bands: 12}}\n"
    )
    with pytest.raises(ConfigError, match="dedup.bands"):
        load_data_config(cfg)
    cfg.write_text("sources: [{name: a, type: text, path: /no/such/dir}]\n")
    with pytest.raises(ConfigError, match=r"sources\[0\].path"):
        load_data_config(cfg)


def test_demo_config_loads(repo_root):
    cfg = load_data_config(f"{repo_root}/configs/data/demo.yaml")
    assert {s.path for s in cfg.sources} >= {"ddtp-ko", "ddtp-ja", "ddtp-en", "python-stdlib"}
    assert cfg.tokenizer.train is not None and cfg.normalize.form == "NFC"

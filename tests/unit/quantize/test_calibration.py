"""Calibration input: formats, language mix, errors naming file/line, per-expert routed token counts."""

import gzip
import json

import numpy as np
import pytest
import torch

from quantize import calibration as C


def test_jsonl_txt_and_gz_are_read_per_language(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hello", "lang": "en"}\n\n{"text": "안녕", "lang": "ko"}\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "こんにちは", "lang": "ja"}) + "\n")
    (tmp_path / "code.txt").write_text("x = 1\n\nprint(x)\n")
    docs = C.read_docs([tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "code.txt"])
    assert docs.text == {"en": ["hello"], "ko": ["안녕"], "ja": ["こんにちは"], "code": ["x = 1", "print(x)"]}
    assert len(docs.files) == 3 and all(len(v) == 64 for v in docs.files.values())


def test_bad_line_is_named(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(C.CalibrationError, match="c.jsonl:2"):
        C.read_docs([p])
    with pytest.raises(C.CalibrationError, match="not a .txt"):
        C.read_docs([tmp_path / "x.csv"])


@pytest.mark.parametrize("spec", ["ko=abc", "ko=-1", "ko=0,en=0", "ko"])
def test_bad_mix_is_refused(spec):
    with pytest.raises(C.CalibrationError, match="--mix"):
        C.parse_mix(spec)


def _shard(prefix, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in docs:
        b.add_document(torch.tensor([i, i + 1, 2], dtype=torch.int32), [3])
    b.finalize(f"{prefix}.idx")


def test_megatron_shards_are_read_from_the_tail(tmp_path):
    _shard(tmp_path / "ko", range(10))
    docs = C.read_docs([tmp_path], shard_docs=3)
    assert docs.ids["ko"] == [[7, 8, 2], [8, 9, 2], [9, 10, 2]]
    assert len(C.read_docs([tmp_path]).ids["ko"]) == 5  # eval holds at most half of a small shard
    calib = C.read_docs([tmp_path], shard_docs=3, part="calib")  # just before the eval half
    assert calib.ids["ko"] == [[2, 3, 2], [3, 4, 2], [4, 5, 2]]
    assert len(C.read_docs([tmp_path], part="calib").ids["ko"]) == 5
    assert set(map(lambda p: p.rsplit("/", 1)[1], docs.files)) == {"ko.bin", "ko.idx"}


def test_shard_parts_are_read_as_one_language(tmp_path):
    """`<lang>-<part>` shards (the shards stage's tasks): the tail of the language, across parts."""
    for p, docs in enumerate((range(0, 4), range(4, 8), range(8, 10))):
        _shard(tmp_path / f"ko-{p:05d}", docs)
    assert C.read_docs([tmp_path], shard_docs=3).ids["ko"] == [[7, 8, 2], [8, 9, 2], [9, 10, 2]]
    assert C.read_docs([tmp_path], shard_docs=3, part="calib").ids["ko"] == [[2, 3, 2], [3, 4, 2], [4, 5, 2]]


def test_mix_sets_the_share_of_sequences(tiny_hf):
    from transformers import AutoTokenizer

    from quantize.samples import SAMPLE_TEXTS

    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    docs = C.Docs(text={k: v * 5 for k, v in SAMPLE_TEXTS.items()})
    seqs = C.token_sequences(docs, tok, 16, 20, {"ko": 3, "en": 1})
    assert set(seqs) == {"ko", "en"} and len(seqs["ko"]) == 15 and len(seqs["en"]) == 5
    assert all(len(s) <= 16 for s in seqs["ko"])
    with pytest.raises(C.CalibrationError, match="names \\['xx'\\]"):
        C.token_sequences(docs, tok, 16, 20, {"xx": 1.0})


def test_routed_counts_find_a_starved_expert(tiny_hf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_hf), dtype=torch.float32)
    model.model.layers[2].mlp.gate.e_score_correction_bias[5] = -10.0  # never selected
    seqs = [list(range(i, i + 24)) for i in range(0, 300, 30)]
    counts = C.count_expert_tokens(model, seqs)
    assert set(counts) == {"layers.1", "layers.2"}
    k = model.config.num_experts_per_tok
    assert all(sum(c) == k * sum(map(len, seqs)) for c in counts.values())
    assert counts["layers.2"][5] == 0
    assert C.starved_experts(counts) == ["layers.2 expert 5"]

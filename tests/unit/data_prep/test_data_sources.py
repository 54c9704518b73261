"""Readers: JSONL (.gz/.zst), Parquet, text directories and `datasets` saved to disk, with a text field."""

import gzip
import json

import pytest

from data_prep.config import DecodeConfig, SourceConfig
from data_prep.records import Doc
from data_prep.sources.files import list_units, read_unit
from data_prep.steps.base import StepCounts
from data_prep.steps.decode import DecodeStep

TEXTS = ["첫 번째 문서입니다.", "두 번째 문서입니다.", "세 번째 문서입니다."]


def _read(src: SourceConfig, root) -> list[str]:
    step = DecodeStep("/tmp/unused", DecodeConfig(), {src.name: src.text_field})
    docs = []
    for unit in list_units([src], [root]):
        for raw in read_unit(unit, src, root):
            doc = step.apply(raw, StepCounts())
            assert isinstance(doc, Doc), doc
            docs.append(doc)
    assert len({d.id for d in docs}) == len(docs)
    return [d.text for d in docs]


def test_jsonl_plain_gz_zst_with_custom_field(tmp_path):
    import zstandard

    lines = "".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in TEXTS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "notes.md").write_text("not an input")
    src = SourceConfig(name="j", type="jsonl", path=str(tmp_path), text_field="content")
    assert _read(src, tmp_path) == TEXTS * 3


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS, "n": [1, 2, 3]}), tmp_path / "x.parquet")
    src = SourceConfig(name="p", type="parquet", path=str(tmp_path), text_field="body")
    assert _read(src, tmp_path) == TEXTS
    bad = SourceConfig(name="p", type="parquet", path=str(tmp_path), text_field="text")
    with pytest.raises(ValueError, match="no column 'text'"):
        _read(bad, tmp_path)


def test_text_directory(tmp_path):
    for i, t in enumerate(TEXTS):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    src = SourceConfig(name="t", type="text", path=str(tmp_path))
    assert _read(src, tmp_path) == TEXTS


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    src = SourceConfig(name="h", type="hf", path=str(tmp_path / "ds"))
    assert _read(src, tmp_path / "ds") == TEXTS


def test_preflight_names_the_key_and_file(tmp_path):
    from data_prep.sources.files import preflight
    from kmoe.configtree import ConfigError

    (tmp_path / "a.jsonl").write_text('{"body": "본문"}\n')
    src = SourceConfig(name="j", type="jsonl", path=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"sources\[0\].text_field: 'text' not in the first record of .*a.jsonl"
    ):
        preflight([src], [tmp_path])
    preflight([SourceConfig(name="j", type="jsonl", path=str(tmp_path), text_field="body")], [tmp_path])
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"sources\[0\] \(t\): no text input"):
        preflight([SourceConfig(name="t", type="text", path=str(empty))], [empty])

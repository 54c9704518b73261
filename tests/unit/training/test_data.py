"""The train stream: megatron GPTDataset blend, deterministic from the seed, clear errors on bad input."""

from pathlib import Path

import pytest
from toy_shards import write_toy_shards

from training.config import load_run_config
from training.data import TrainData

CONFIG = str(Path(__file__).resolve().parents[3] / "configs/train/toy.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=80)


def data(shards, *extra):
    return TrainData(load_run_config(CONFIG, [f"data.shards={shards}", *extra]))


def test_deterministic_blend_and_batch_hash(shards):
    a, b = data(shards, "data.blend={ko: 0.5, en: 0.5}"), data(shards, "data.blend={ko: 0.5, en: 0.5}")
    ba, bb = a.global_batch(3), b.global_batch(3)
    assert ba.sha256 == bb.sha256 and ba.sample_indices == list(range(24, 32))
    langs = [lang for i in range(10) for lang in a.global_batch(i).langs]
    assert set(langs) == {"ko", "en"} and abs(langs.count("ko") - 40) <= 2
    other = data(shards, "data.blend={ko: 0.5, en: 0.5}", "train.seed=7")
    assert other.global_batch(3).sha256 != ba.sha256
    assert ba.tokens_GS.shape == (8, 32) and (ba.labels_GS[:, :-1] == ba.tokens_GS[:, 1:]).all()


def test_language_in_parts_reads_as_one_language(shards, tmp_path):
    """Shards written in parts (the shards stage's tasks) blend as their languages: same language shares,
    one validation set per language, batches that are a function of the files (same hash on a rebuild)."""
    parted = write_toy_shards(tmp_path / "parts", n_docs=80, parts=3)
    a, b = data(parted, "data.blend={ko: 0.5, en: 0.5}"), data(parted, "data.blend={ko: 0.5, en: 0.5}")
    assert [len(p) for p in a.prefixes.values()] == [3, 3, 3, 3]
    langs = [lang for i in range(10) for lang in a.global_batch(i).langs]
    assert set(langs) == {"ko", "en"} and abs(langs.count("ko") - 40) <= 3
    assert a.global_batch(5).sha256 == b.global_batch(5).sha256
    assert sorted(data(parted).valid_sets()) == ["code", "en", "ja", "ko"]


def test_valid_sets_per_language(shards):
    d = data(shards)
    assert set(d.valid_sets()) == {"ko", "en", "ja", "code"}
    assert d.describe()["root_hash"]


def test_unknown_language_names_the_key(shards):
    with pytest.raises(ValueError, match=r"data\.blend\.fr"):
        data(shards, "data.blend={ko: 1.0, fr: 1.0}")


def test_missing_tokenizer_and_too_small_vocab(shards, tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer"):
        data(shards, f"data.tokenizer={tmp_path}")
    small = data(shards, "model.vocab_size=200")
    with pytest.raises(ValueError, match="model.vocab_size 200"):
        small.global_batch(0)

"""Tokenizer: config checks, corpus reading, weighted sampling, training, loading, digest, HF parity (fast)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer, validate_config
from data_prep.tokenizer_hf import EDGE_CASES, parity
from data_prep.tokenizer_sample import chunk_document, read_kept_corpus, sample_corpus
from kmoe.configtree import ConfigError, load

# A small self-written multilingual corpus in the kept-corpus layout.
KO = [
    "오늘은 날씨가 맑고 바람이 시원합니다.",
    "우리는 한국어 문장을 효율적으로 나누는 토크나이저를 만듭니다.",
    "도서관에서 책을 빌려서 주말 동안 읽었습니다.",
    "서울의 지하철은 아침마다 사람들로 붐빕니다.",
    "컴퓨터 프로그램은 입력을 받아 결과를 출력합니다.",
    "김치찌개와 된장국 중에서 무엇을 먹을까요?",
]
EN = [
    "The weather is clear today and the wind is cool.",
    "We build a tokenizer that splits sentences efficiently.",
    "She borrowed a book from the library and read it over the weekend.",
    "Computer programs take input and print results.",
]
JA = ["今日は天気が良くて風が涼しいです。", "図書館で本を借りて週末に読みました。"]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
]


def docs(lang: str, n: int) -> list[dict]:
    base = {"ko": KO, "en": EN, "ja": JA, "code": CODE}[lang]
    out = []
    for i in range(n):
        a, b = base[i % len(base)], base[(i * 7 + 3) % len(base)]
        text = f"{a} {b}\n{i}번째 {a}" if lang == "ko" else f"{a}\n{b} {i}"
        out.append({"id": f"{lang}-{i}", "text": text, "lang": lang, "source": "fixture"})
    return out


def write_corpus(root: Path, sizes: dict[str, int] | None = None) -> Path:
    for lang, n in (sizes or {"ko": 300, "en": 300, "ja": 100, "code": 100}).items():
        (root / "kept" / lang).mkdir(parents=True, exist_ok=True)
        with gzip.open(root / "kept" / lang / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in docs(lang, n):
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return root


SMALL = {"vocab_size": 700, "sample_chars": 200_000, "num_reserved": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    corpus = write_corpus(root / "corpus")
    return train_tokenizer(corpus, TokenizerConfig(**SMALL), root / "tok")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        validate_config(TokenizerConfig(vocab_size=100))
    with pytest.raises(ConfigError, match="language_weights"):
        validate_config(TokenizerConfig(language_weights={"ko": -1.0}))
    bad = tmp_path / "t.yaml"
    bad.write_text("vocab_sise: 8000\n")
    with pytest.raises(ConfigError, match="vocab_sise"):
        load(TokenizerConfig, bad)


def test_demo_config_loads(repo_root):
    cfg = load(TokenizerConfig, Path(repo_root) / "configs/tokenizer/demo.yaml")
    validate_config(cfg)
    assert cfg.vocab_size == 8192 and cfg.model_type == "bpe"


def test_bad_corpus_line_is_named(tmp_path):
    shard = tmp_path / "kept" / "ko" / "00000.jsonl.gz"
    shard.parent.mkdir(parents=True)
    with gzip.open(shard, "wt") as f:
        f.write(json.dumps({"text": "좋아요", "lang": "ko"}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"00000.jsonl.gz:2"):
        read_kept_corpus(tmp_path)
    with gzip.open(shard, "wt") as f:
        f.write(json.dumps({"text": "hello", "lang": "en"}) + "\n")
    with pytest.raises(ValueError, match="lang 'en' in the 'ko' folder"):
        read_kept_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="kept"):
        read_kept_corpus(tmp_path / "nothing")


def test_chunking_keeps_every_character():
    text = "line one\n" * 50 + "x" * 130 + "\nend"
    chunks = chunk_document(text, 40)
    assert "".join(chunks) == text
    assert max(map(len, chunks)) <= 40


def test_sampling_follows_weights_and_is_deterministic(tmp_path):
    texts = read_kept_corpus(write_corpus(tmp_path, {"ko": 200, "en": 800}))
    cfg = TokenizerConfig(sample_chars=60_000, max_upsample=10.0)
    sents, stats = sample_corpus(texts, {"ko": 0.5, "en": 0.5}, cfg.sample_chars, cfg)
    assert sents == sample_corpus(texts, {"ko": 0.5, "en": 0.5}, cfg.sample_chars, cfg)[0]
    # Korean is the smaller language but gets half of the sample (by repetition where needed).
    assert abs(stats["ko"]["sampled_chars"] / stats["en"]["sampled_chars"] - 1) < 0.05
    natural = sample_corpus(texts, None, 30_000, cfg)[1]
    sampled, avail = ({k: natural[k][f] for k in ("ko", "en")} for f in ("sampled_chars", "available_chars"))
    assert sampled["ko"] / sum(sampled.values()) == pytest.approx(avail["ko"] / sum(avail.values()), abs=0.03)
    with pytest.raises(ConfigError, match="no weight"):
        sample_corpus(texts, {"ko": 1.0}, 1000, cfg)


def test_upsampling_is_capped(tmp_path):
    texts = read_kept_corpus(write_corpus(tmp_path, {"ko": 20, "en": 800}))
    cfg = TokenizerConfig(max_upsample=2.0)
    stats = sample_corpus(texts, {"ko": 0.9, "en": 0.1}, 100_000, cfg)[1]
    assert stats["ko"]["sampled_chars"] <= 2 * stats["ko"]["available_chars"] + cfg.chunk_chars


def test_trained_dir_matches_the_contract(trained):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (trained / name).is_file(), name
    meta = json.loads((trained / "kmoe_tokenizer.json").read_text())
    assert (
        meta["special_ids"]["bos"] == 1
        and meta["special_ids"]["eos"] == 2
        and meta["special_ids"]["pad"] == 3
    )
    tok = load_tokenizer(trained)
    assert tok.vocab_size == 700 and tok.digest == meta["digest"] and len(tok.digest) == 64
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert meta["special_ids"]["<|im_start|>"] == 4


def test_encode_is_lossless_and_adds_no_specials(trained):
    tok = load_tokenizer(trained)
    for text in EDGE_CASES:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        if "\u2581" not in text:  # sentencepiece reads a literal U+2581 as a space
            assert tok.decode(ids) == text, repr(text)
    assert tok.encode("") == []
    assert tok.encode_document("한국어") == [tok.bos_id, *tok.encode("한국어"), tok.eos_id]
    # Raw text cannot inject control tokens into the corpus encoding.
    assert 4 not in tok.encode("<|im_start|>") and tok.decode(tok.encode("<|im_start|>")) == "<|im_start|>"
    with pytest.raises(ValueError, match="str"):
        tok.encode(b"bytes")


def test_training_is_deterministic_and_tampering_is_caught(trained, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    again = train_tokenizer(corpus, TokenizerConfig(**SMALL), tmp_path / "tok")
    assert load_tokenizer(again).digest == load_tokenizer(trained).digest
    # trained into another folder, every file is byte-identical (so a data build's root hash is too)
    for f in sorted(p.name for p in trained.iterdir()):
        assert (again / f).read_bytes() == (trained / f).read_bytes(), f
    for name, old, new in [
        ("tokenizer_config.json", '"add_bos_token": true', '"add_bos_token": false'),
        ("tokenizer.json", '"<s>"', '"<S>"'),
    ]:
        original = (again / name).read_text()
        (again / name).write_text(original.replace(old, new, 1))
        with pytest.raises(ValueError, match="digest"):
            load_tokenizer(again)
        (again / name).write_text(original)
    load_tokenizer(again)


def test_hf_parity_on_edge_cases(trained):
    res = parity(trained, EDGE_CASES)
    assert res["hf_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert (res["id_mismatches"], res["decode_mismatches"], res["bos_mismatches"]) == (0, 0, 0), res


def test_hf_maps_special_literals_to_ids(trained):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained))
    ids = hf.encode("<|im_start|>user", add_special_tokens=False)
    assert ids[0] == 4
    chat = hf.apply_chat_template([{"role": "user", "content": "안녕"}], tokenize=False)
    assert chat == "<s><|im_start|>user\n안녕<|im_end|>\n"
    assert hf.decode(hf("안녕 hello")["input_ids"], skip_special_tokens=True) == "안녕 hello"


def test_unigram_option_trains_and_exports(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = train_tokenizer(
        corpus, TokenizerConfig(**{**SMALL, "vocab_size": 450}, model_type="unigram"), tmp_path / "uni"
    )
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("한국어  code\n\tx")) == "한국어  code\n\tx"
    # Decoding always agrees. Ids can differ (docs/tokenizer.md) on near-tie segmentations and where a literal
    # "<0x41>" sits between characters missing from a small vocabulary; the other edge cases agree.
    res = parity(out, [t for t in EDGE_CASES if "<0x" not in t])
    assert (res["id_mismatches"], res["decode_mismatches"]) == (0, 0), res
    assert parity(out, EDGE_CASES)["decode_mismatches"] == 0

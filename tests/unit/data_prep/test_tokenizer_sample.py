"""The tokenizer's training text: held-out slice, sentence cuts, the vocabulary check (same numbers as
sentencepiece), KS X 1001 syllables, multi-word pieces with HF parity."""

from __future__ import annotations

import dataclasses

import pytest
from test_tokenizer import SMALL, docs, write_corpus

from data_prep.tokenizer import (
    TokenizerConfig,
    check_vocab_fits,
    load_tokenizer,
    required_chars,
    sp_trainer_options,
    train_sentencepiece,
    train_tokenizer,
)
from data_prep.tokenizer_hf import EDGE_CASES, parity
from data_prep.tokenizer_sample import is_heldout, read_kept_corpus, sample_corpus, split_sentences
from kmoe.configtree import ConfigError


def test_sentences_are_cut_at_sentence_ends_only():
    text = "설치합니다. 이 패키지는 도구입니다.  Next one! 終わり。次\nwrapped line. end"
    assert split_sentences(text) == [
        "설치합니다.",
        "이 패키지는 도구입니다.",
        "Next one!",
        "終わり。次\nwrapped line.",
        "end",
    ]
    cfg = TokenizerConfig(sentence_split=True, sample_chars=4000)
    texts = {"ko": [d["text"] for d in docs("ko", 20)], "code": ["x = 1. y = 2\n" * 10]}
    sents, _ = sample_corpus(texts, {"ko": 0.5, "code": 0.5}, cfg.sample_chars, cfg)
    assert any(s.startswith("x = 1. y = 2") for s in sents)  # code is never cut at ". "
    assert not any(". " in s for s in sents if not s.startswith("x = 1"))


def test_heldout_slice_is_disjoint_and_stable(tmp_path):
    corpus = write_corpus(tmp_path, {"ko": 200, "en": 200})
    train, held = read_kept_corpus(corpus, 0.1), read_kept_corpus(corpus, 0.1, part="heldout")
    assert sum(map(len, train.values())) + sum(map(len, held.values())) == 400
    n_held = sum(is_heldout(d["id"], 0.1) for lang in ("ko", "en") for d in docs(lang, 200))
    assert sum(map(len, held.values())) == n_held and 15 < n_held < 70
    assert read_kept_corpus(corpus) == read_kept_corpus(corpus, 0.0)  # no slice: every document trains


@pytest.mark.parametrize("overrides", [{}, {"required_hangul": "ks_x_1001", "vocab_size": 2600}])
def test_vocab_check_gives_sentencepieces_numbers(tmp_path, overrides):
    texts = read_kept_corpus(write_corpus(tmp_path))
    cfg = TokenizerConfig(**{**SMALL, "vocab_size": 400, **overrides})
    sents, _ = sample_corpus(texts, cfg.language_weights, cfg.sample_chars, cfg)
    with pytest.raises(ConfigError) as ours:
        check_vocab_fits(sents, cfg)
    with pytest.raises(ValueError) as theirs:
        train_sentencepiece(sents, sp_trainer_options(cfg), cfg.seed)
    need = int(str(ours.value).split(" the ")[1].split()[0])
    assert f"{cfg.vocab_size} vs {need}." in str(
        theirs.value
    )  # sentencepiece: "Vocabulary size is smaller..."
    check_vocab_fits(sents, dataclasses.replace(cfg, vocab_size=need))  # exactly enough passes


def test_ks_x_1001_syllables_are_single_pieces(tmp_path):
    ks = required_chars(TokenizerConfig(required_hangul="ks_x_1001"))
    assert len(ks) == 2350 and "가" in ks and "똠" not in ks  # 똠: a syllable outside KS X 1001
    cfg = TokenizerConfig(**{**SMALL, "vocab_size": 2700}, required_hangul="ks_x_1001")
    tok = load_tokenizer(train_tokenizer(write_corpus(tmp_path / "c"), cfg, tmp_path / "tok"))
    unseen = "붓 늬 짝 빔 쇠"  # common syllables missing from the fixture corpus
    assert len(tok.encode(unseen)) <= 2 * len(unseen.split())
    assert len(tok.encode("똠")) >= 3  # not in the set and not in the corpus: UTF-8 bytes


def test_multi_word_pieces_keep_hf_parity(tmp_path):
    cfg = TokenizerConfig(**SMALL, split_by_whitespace=False, sentence_split=True)
    out = train_tokenizer(write_corpus(tmp_path / "c"), cfg, tmp_path / "tok")
    sp = load_tokenizer(out).sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert any("\u2581" in p.strip("\u2581") for p in pieces)  # some piece spans two words
    assert not any(". " in p.replace("\u2581", " ") for p in pieces)  # none spans a sentence end
    texts = [d["text"] for lang in ("ko", "en", "ja") for d in docs(lang, 30)]
    res = parity(out, EDGE_CASES + texts)
    assert (res["id_mismatches"], res["decode_mismatches"], res["bos_mismatches"]) == (0, 0, 0), res

"""Tokenizer end to end on real text: train with the demo config, HF parity, export, efficiency report.

The corpus is the dev corpus (DDTP ko/ja/en + Python stdlib, fetched at run time into .cache/, see
data_prep/tokenizer_devcorpus.py) until `kmoe data build` output replaces it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from data_prep.tokenizer import load_tokenizer, tokenizer_digest
from data_prep.tokenizer_hf import EDGE_CASES, parity
from data_prep.tokenizer_sample import read_kept_corpus
from kmoe.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO_CFG = str(REPO / "configs/tokenizer/demo.yaml")


@pytest.fixture(scope="module")
def corpus() -> Path:
    from data_prep.tokenizer_devcorpus import ensure_dev_corpus

    try:
        return ensure_dev_corpus(REPO / ".cache/tok-dev", REPO / ".cache/data")
    except RuntimeError as e:  # apt-get itself failed: no Debian mirror reachable
        if not str(e).startswith("demo fetch failed"):
            raise
        pytest.skip(f"cannot fetch the dev corpus: {str(e)[-300:]!r}")


@pytest.fixture(scope="module")
def demo_tok(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "demo"
    t0 = time.perf_counter()
    assert main(["tokenizer", "train", "--config", DEMO_CFG, "--corpus", str(corpus), "--out", str(out)]) == 0
    # Acceptance: the demo tokenizer trains in under 2 minutes on this machine (parity check included).
    assert time.perf_counter() - t0 < 120
    return out


def _sample(corpus: Path, per_lang: int | None) -> list[str]:
    texts = list(EDGE_CASES)
    for _lang, docs in sorted(read_kept_corpus(corpus).items()):
        texts += docs if per_lang is None else random.Random(7).sample(docs, min(per_lang, len(docs)))
    return texts


def test_parity_on_thousands_of_real_strings(demo_tok, corpus):
    # Documents, and single lines of them (short strings start and end in the middle of text).
    docs = _sample(corpus, 400)
    lines = [ln for d in docs[len(EDGE_CASES) :] for ln in d.split("\n")[:3]]
    res = parity(demo_tok, docs + lines)
    assert res["strings"] > 3000
    assert (res["id_mismatches"], res["decode_mismatches"], res["bos_mismatches"]) == (0, 0, 0), res


@pytest.mark.full
def test_parity_on_the_whole_corpus_and_heldout(demo_tok, corpus):
    held = [p for f in sorted((corpus / "heldout").glob("*.txt")) for p in f.read_text().split("\n\n")]
    res = parity(demo_tok, _sample(corpus, None) + held)
    assert (res["id_mismatches"], res["decode_mismatches"], res["bos_mismatches"]) == (0, 0, 0), res


def test_hf_export_carries_the_tokenizer(demo_tok, tmp_path):
    from transformers import AutoTokenizer

    tiny = str(REPO / "configs/model/tiny.yaml")
    assert main(["model", "smoke", "--config", tiny, "--out", str(tmp_path / "ckpt")]) == 0
    hf_dir = tmp_path / "hf"
    assert main(["export", "hf", str(tmp_path / "ckpt"), str(hf_dir), "--tokenizer", str(demo_tok)]) == 0
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = load_tokenizer(demo_tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    # The export carries both hashed files, so an auditor recomputes the same tokenizer digest from it.
    assert tokenizer_digest(hf_dir) == tok.digest
    # Loaded next to a glm4_moe config.json, AutoTokenizer must still be our tokenizer.
    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in EDGE_CASES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
        assert hf(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]


def _trim(src: Path, dst: Path, paras: int) -> str:
    dst.write_text("\n\n".join(src.read_text().split("\n\n")[:paras]))
    return f"{src.stem}={dst}"


def test_report_fast(corpus, tmp_path, capsys):
    # A smaller sample keeps this quick; the acceptance figures are checked at full size below.
    out = tmp_path / "tok"
    small = ["--set", "sample_chars=2000000"]
    assert (
        main(["tokenizer", "train", "--config", DEMO_CFG, *small, "--corpus", str(corpus), "--out", str(out)])
        == 0
    )
    texts = [
        _trim(corpus / "heldout" / f"{lang}.txt", tmp_path / f"{lang}.txt", 300) for lang in ("ko", "en")
    ]
    capsys.readouterr()
    assert main(["tokenizer", "report", str(out), "--text", *texts, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ko = rep["languages"]["ko"]
    assert ko["ours"]["lossless"] == 1.0
    assert ko["byte_level"]["bytes_per_token"] == 1.0
    assert ko["ours"]["tokens"] < ko["sp_default"]["tokens"] < ko["byte_level"]["tokens"]


@pytest.mark.full
def test_report_meets_acceptance(demo_tok, corpus, capsys):
    texts = [str(p) for p in sorted((corpus / "heldout").glob("*.txt"))]
    capsys.readouterr()
    assert main(["tokenizer", "report", str(demo_tok), "--text", *texts, "--json"]) == 0
    langs = json.loads(capsys.readouterr().out)["languages"]
    assert langs["ko"]["tokens_per_char_vs_default"] <= -0.10
    assert langs["ko-gnome"]["tokens_per_char_vs_default"] <= -0.10  # Korean from a domain never trained on
    assert langs["en"]["tokens_per_char_vs_default"] <= 0.05
    # sp-default drops indentation and newlines; on the text it actually sees we are within 5%.
    assert langs["code"]["same_text_vs_default"] <= 0.05

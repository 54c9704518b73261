"""What moves Korean efficiency on unseen Korean: tokenizer settings against the default-sentencepiece baseline.

    .venv/bin/python bench/tokenizer_korean.py --corpus .cache/demo/data [--vocab 8192] [--sample-chars N]
                                               [--variants NAME ...] [--heldout-frac 0.05]

Trains each variant (data_prep.tokenizer, as `kmoe tokenizer train` does) on the kept corpus of a `kmoe data
build` OUT, leaving out the same held-out slice of documents as the baseline, and prints tokens per character
relative to sentencepiece with default settings trained in the same run on the same documents in natural
proportions, same vocabulary and sample size (negative = fewer tokens than the baseline). Measured on
out-of-domain Korean (six registry sources no kmoe corpus trains on, data_prep/tokenizer_heldout.py; overall
and the worst source) and on the held-out documents per language (in-domain); `code~` is code on the text as sp-default sees it (it
deletes indentation and newlines). docs/tokenizer.md quotes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sentencepiece as spm  # noqa: E402

from data_prep.tokenizer import TokenizerConfig, sp_trainer_options, train_sentencepiece  # noqa: E402
from data_prep.tokenizer_heldout import ensure_heldout_ko  # noqa: E402
from data_prep.tokenizer_report import read_texts, train_default_baseline  # noqa: E402
from data_prep.tokenizer_sample import read_kept_corpus, sample_corpus  # noqa: E402
from kmoe.configtree import load  # noqa: E402

OLD = {"ko": 0.25, "en": 0.45, "ja": 0.12, "code": 0.18}  # the weights chosen on the dev corpus before
# The chosen settings: configs/tokenizer/demo.yaml without its size; each variant changes one or two of them.
DEMO = load(TokenizerConfig, ROOT / "configs/tokenizer/demo.yaml")
CHOSEN = {
    f: getattr(DEMO, f)
    for f in ("language_weights", "split_by_whitespace", "sentence_split", "required_hangul")
}
PLAIN = {"split_by_whitespace": True, "sentence_split": False}
VARIANTS: dict[str, dict] = {
    "natural-weights": {**CHOSEN, **PLAIN, "language_weights": None},
    "old-weights": {**CHOSEN, **PLAIN, "language_weights": OLD},
    "chosen-weights": {**CHOSEN, **PLAIN},
    "+multi-word": {**CHOSEN, "sentence_split": False},
    "+sentence-split": CHOSEN,
    "+ks-x-1001": {**CHOSEN, "required_hangul": "ks_x_1001"},
    "+script-split": {**CHOSEN, "split_by_unicode_script": True},
    "unigram": {**CHOSEN, "model_type": "unigram"},
}


def tokens_per_char(sp, docs: list[str]) -> tuple[int, int]:
    return sum(len(ids) for ids in sp.encode(docs)), sum(map(len, docs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / ".cache/demo/data", help="a `kmoe data build` OUT")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--sample-chars", type=int, default=3_000_000)
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--weights", nargs="*", default=[], metavar="ko=..,en=..,ja=..,code=..",
        help="also the chosen settings with these language weights",
    )  # fmt: skip
    args = ap.parse_args()
    for spec in args.weights:
        VARIANTS[spec] = {
            **CHOSEN,
            "language_weights": {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))},
        }
        args.variants.append(spec)

    base_cfg = TokenizerConfig(
        vocab_size=args.vocab, sample_chars=args.sample_chars, heldout_frac=args.heldout_frac
    )
    train = read_kept_corpus(args.corpus, args.heldout_frac)
    evals = read_kept_corpus(args.corpus, args.heldout_frac, part="heldout")
    ood = read_texts([str(p) for p in ensure_heldout_ko(ROOT / ".cache/heldout-ko", ROOT / ".cache/data")])
    evals.update(ood)
    t0 = time.perf_counter()
    base, _ = train_default_baseline(args.corpus, base_cfg)
    print(f"baseline: sentencepiece defaults, vocab {args.vocab}, sample {args.sample_chars:,} chars in natural "
          f"proportions, trained in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    base_tc = {name: tokens_per_char(base, docs) for name, docs in evals.items()}
    langs = [n for n in ("ko", "en", "ja", "code") if n in evals]
    # Code like for like: sp-default deletes indentation and newlines, so also measure ours on that text.
    code_seen = [base.normalize(d).replace("\u2581", " ")[1:] for d in evals.get("code", [])]
    print(
        f"{'variant':<18} {'ko-ood':>7} {'worst ko-ood source':>24} " + " ".join(f"{n:>6}" for n in langs),
        flush=True,
    )
    for name in args.variants:
        over = VARIANTS[name]
        weights = over["language_weights"]
        cfg = dataclasses.replace(base_cfg, **{k: v for k, v in over.items() if k != "language_weights"})
        t0 = time.perf_counter()
        sentences, _ = sample_corpus(train, weights, cfg.sample_chars, cfg)
        sp = spm.SentencePieceProcessor(
            model_proto=train_sentencepiece(sentences, sp_trainer_options(cfg), cfg.seed)
        )
        rel = {}
        for ev, docs in evals.items():
            (t, _), (b, _) = tokens_per_char(sp, docs), base_tc[ev]
            rel[ev] = t / b - 1
        ood_ours = sum(tokens_per_char(sp, evals[n])[0] for n in ood)
        ood_base = sum(base_tc[n][0] for n in ood)
        worst = max(ood, key=rel.get)
        if code_seen:
            langs_extra = f" {tokens_per_char(sp, code_seen)[0] / base_tc['code'][0] - 1:>+6.1%}"
        else:
            langs_extra = ""
        print(f"{name:<18} {ood_ours / ood_base - 1:>+7.1%} {worst.split('.', 1)[1] + f' {rel[worst]:+.1%}':>24} "
              + " ".join(f"{rel[n]:>+6.1%}" for n in langs) + langs_extra + f"   ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

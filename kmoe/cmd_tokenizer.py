"""`kmoe tokenizer train|report|parity`: thin wrappers over data_prep.tokenizer*."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from kmoe.output import emit

log = logging.getLogger(__name__)

DEV_CORPUS = Path(".cache/tok-dev")  # dev/test stand-in until `kmoe data build` output is passed in
HELDOUT_KO = Path(".cache/heldout-ko")  # out-of-domain Korean (data_prep/tokenizer_heldout.py)


def register(sub: argparse._SubParsersAction) -> None:
    p_tok = sub.add_parser("tokenizer", help="train, check and report on the sentencepiece tokenizer")
    tsub = p_tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    p = tsub.add_parser("train", help="train sentencepiece on the kept corpus and export the HF tokenizer")
    p.add_argument("--config", required=True, help="a configs/tokenizer/*.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", required=True, help="tokenizer directory to write")
    p.add_argument(
        "--corpus",
        help="corpus dir with kept/<lang>/*.jsonl.gz (a `kmoe data build` OUT works too); "
        f"default: fetch a small real dev corpus into {DEV_CORPUS}",
    )
    p.add_argument("--parity-docs", type=int, default=300, help="corpus docs per language to parity-check")
    p.set_defaults(func=cmd_train)

    p = tsub.add_parser("report", help="chars/token, tokens/word, bytes/token vs byte-level and sp defaults")
    p.add_argument("tokenizer_dir")
    p.add_argument("--text", nargs="+", default=[], metavar="[LANG=]FILE", help="held-out text per language")
    p.add_argument(
        "--heldout",
        action="store_true",
        help="also the corpus documents the tokenizer left out (heldout_frac)",
    )
    p.add_argument(
        "--ood-ko",
        action="store_true",
        help=f"also Korean from registry sources no kmoe corpus trains on (fetched into {HELDOUT_KO})",
    )
    p.add_argument("--corpus", help="corpus for the default-settings baseline (default: the training corpus)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save", metavar="PATH", help="also write the report as JSON to PATH")
    p.set_defaults(func=cmd_report)

    p = tsub.add_parser("parity", help="compare sentencepiece with the HF tokenizer (AutoTokenizer)")
    p.add_argument("tokenizer_dir")
    p.add_argument("--corpus", help="also check documents from this corpus")
    p.add_argument("--docs", type=int, default=1000, help="documents per language from --corpus")
    p.set_defaults(func=cmd_parity)


def _corpus(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from data_prep.tokenizer_devcorpus import ensure_dev_corpus

    log.info("no --corpus: using the dev corpus in %s (DDTP ko/ja/en + Python stdlib)", DEV_CORPUS)
    return ensure_dev_corpus(DEV_CORPUS, Path(".cache/data"))


def _parity_texts(corpus: Path | None, per_lang: int) -> list[str]:
    import random

    from data_prep.tokenizer_hf import EDGE_CASES
    from data_prep.tokenizer_sample import read_kept_corpus

    texts = list(EDGE_CASES)
    if corpus:
        for lang, docs in sorted(read_kept_corpus(corpus).items()):
            texts += random.Random(lang).sample(docs, min(per_lang, len(docs)))
    return texts


def _emit_parity(res: dict) -> None:
    emit(
        f"parity vs AutoTokenizer ({res['hf_class']}) on {res['strings']} strings: "
        f"{res['id_mismatches']} id mismatches, {res['decode_mismatches']} decode mismatches, "
        f"{res['bos_mismatches']} BOS-framing mismatches"
    )
    for ex in res["examples"]:
        emit("  " + json.dumps(ex, ensure_ascii=False))


def cmd_train(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
    from data_prep.tokenizer_hf import parity
    from kmoe.configtree import load

    cfg = load(TokenizerConfig, args.config, args.set)
    corpus = _corpus(args.corpus)
    t0 = time.perf_counter()
    out = train_tokenizer(corpus, cfg, Path(args.out))
    took = time.perf_counter() - t0
    tok = load_tokenizer(out)
    emit(
        f"tokenizer {out}: {cfg.model_type} vocab {tok.vocab_size}, bos {tok.bos_id} eos {tok.eos_id} "
        f"pad {tok.pad_id}, trained in {took:.1f}s; digest {tok.digest}"
    )
    res = parity(out, _parity_texts(corpus, args.parity_docs))
    _emit_parity(res)
    if res["id_mismatches"] or res["decode_mismatches"] or res["bos_mismatches"]:
        if cfg.model_type == "unigram" and not res["decode_mismatches"]:
            # Known: HF's Viterbi breaks near-ties between equal-length segmentations differently.
            log.warning("unigram: HF ids differ from sentencepiece on some strings; use bpe for exact parity")
            return 0
        raise ValueError(f"{out}: the HF tokenizer does not match sentencepiece (see above)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from data_prep.tokenizer_report import build_report, format_report, heldout_texts, read_texts

    corpus = Path(args.corpus) if args.corpus else None
    texts = read_texts(args.text)
    if args.heldout:
        texts.update(heldout_texts(Path(args.tokenizer_dir), corpus))
    if args.ood_ko:
        from data_prep.tokenizer_heldout import ensure_heldout_ko

        texts.update(read_texts([str(p) for p in ensure_heldout_ko(HELDOUT_KO, Path(".cache/data"))]))
    rep = build_report(Path(args.tokenizer_dir), texts, corpus)
    if args.save:
        Path(args.save).write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    emit(json.dumps(rep, indent=2, ensure_ascii=False) if args.json else format_report(rep))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from data_prep.tokenizer_hf import parity

    res = parity(
        Path(args.tokenizer_dir), _parity_texts(Path(args.corpus) if args.corpus else None, args.docs)
    )
    _emit_parity(res)
    return 1 if res["id_mismatches"] or res["decode_mismatches"] or res["bos_mismatches"] else 0

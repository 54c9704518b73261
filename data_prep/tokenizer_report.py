"""Tokenizer efficiency report against two baselines built in the same run.

Baselines: byte-level (one token per UTF-8 byte, the floor any tokenizer must beat) and sentencepiece with its
default settings trained on the same training documents (the held-out slice left out likewise) in their natural
language proportions (no weighting) at the same vocabulary size and sample size. Texts are measured per name (a
language, a held-out source); a text file is split into paragraphs. Names with a dot (`ko-ood.man`) are members
of a group (`ko-ood`), which also gets an overall row: tokens summed over its members.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.tokenizer import TokenizerConfig, load_tokenizer, train_sentencepiece
from data_prep.tokenizer_sample import read_kept_corpus, sample_corpus
from kmoe.configtree import from_dict

log = logging.getLogger(__name__)


@dataclass
class Measure:
    docs: int
    chars: int
    bytes: int
    words: int
    tokens: int
    lossless_docs: int  # decode(encode(doc)) == doc

    def row(self) -> dict:
        return {
            "tokens": self.tokens,
            "chars_per_token": self.chars / max(self.tokens, 1),
            "tokens_per_word": self.tokens / max(self.words, 1),
            "bytes_per_token": self.bytes / max(self.tokens, 1),
            "tokens_per_char": self.tokens / max(self.chars, 1),
            "lossless": self.lossless_docs / max(self.docs, 1),
        }


def read_texts(specs: list[str]) -> dict[str, list[str]]:
    """`LANG=FILE` or `FILE` named after its language (ko.txt); paragraphs split on blank lines."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        lang, _, path = spec.rpartition("=")
        path = Path(path)
        lang = lang or path.stem
        if not path.is_file():
            raise FileNotFoundError(f"--text {spec}: no such file")
        paras = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not paras:
            raise ValueError(f"--text {spec}: file has no text")
        out.setdefault(lang, []).extend(paras)
    return out


def measure(encode, decode, docs: list[str]) -> Measure:
    tokens = lossless = 0
    for d in docs:
        ids = encode(d)
        tokens += len(ids)
        lossless += decode(ids) == d
    return Measure(
        docs=len(docs),
        chars=sum(map(len, docs)),
        bytes=sum(len(d.encode()) for d in docs),
        words=sum(len(d.split()) for d in docs),
        tokens=tokens,
        lossless_docs=lossless,
    )


def train_default_baseline(corpus_dir: Path, cfg: TokenizerConfig):
    """sentencepiece defaults (unigram, nmt_nfkc, no byte fallback) on the unweighted corpus sample."""
    import dataclasses

    import sentencepiece as spm

    plain = dataclasses.replace(cfg, sentence_split=False)  # training text as the corpus has it
    texts = read_kept_corpus(corpus_dir, cfg.heldout_frac)
    sentences, stats = sample_corpus(texts, None, cfg.sample_chars, plain)
    # Only the vocabulary size and the input-length limit (so the same sample loads) differ from defaults.
    options = {
        "vocab_size": cfg.vocab_size,
        "max_sentence_length": cfg.chunk_chars * 4 + 16,
        "minloglevel": 2,
        "num_threads": cfg.num_threads,
    }
    model = train_sentencepiece(sentences, options, cfg.seed)
    return spm.SentencePieceProcessor(model_proto=model), stats


def _tokens_on_default_view(tok, base, docs: list[str]) -> int:
    return sum(len(tok.encode(base.normalize(d).replace("\u2581", " ")[1:])) for d in docs)


def recorded_corpus(tok_dir: Path, corpus_dir: Path | None = None) -> tuple[TokenizerConfig, Path]:
    """The tokenizer's config and its training corpus (`corpus_dir` overrides the one it recorded)."""
    meta = json.loads((Path(tok_dir) / "kmoe_tokenizer.json").read_text(encoding="utf-8"))
    cfg = from_dict(TokenizerConfig, meta["config"])
    recorded = meta.get("corpus_dir")
    if not corpus_dir and not recorded:
        raise ValueError(f"{tok_dir}: no corpus recorded; pass --corpus DIR for the default baseline")
    if recorded and not Path(recorded).is_absolute():
        recorded = str(Path(tok_dir) / recorded)  # recorded relative to the tokenizer dir
    return cfg, Path(corpus_dir or recorded)


def heldout_texts(tok_dir: Path, corpus_dir: Path | None = None) -> dict[str, list[str]]:
    """The corpus documents the tokenizer never trained on (its `heldout_frac` slice), per language."""
    cfg, corpus = recorded_corpus(tok_dir, corpus_dir)
    if cfg.heldout_frac <= 0:
        raise ValueError(f"{tok_dir}: trained with heldout_frac 0, so no corpus document was held out")
    return read_kept_corpus(corpus, cfg.heldout_frac, part="heldout")


def build_report(tok_dir: Path, texts: dict[str, list[str]], corpus_dir: Path | None = None) -> dict:
    """Measure our tokenizer and both baselines on `texts` (name -> documents); returns a JSON-able dict."""
    tok = load_tokenizer(tok_dir)
    cfg, corpus = recorded_corpus(tok_dir, corpus_dir)
    if not texts:
        raise ValueError("tokenizer report: no text to measure (give --text, --heldout or --ood-ko)")
    t0 = time.perf_counter()
    base, base_stats = train_default_baseline(corpus, cfg)
    log.info("default-settings baseline trained in %.1fs", time.perf_counter() - t0)
    langs = {}
    for lang, docs in texts.items():
        ours = measure(tok.encode, tok.decode, docs)
        default = measure(base.encode, base.decode, docs)
        byte = measure(lambda d: d.encode(), lambda b: bytes(b).decode(), docs)
        langs[lang] = {
            "docs": ours.docs,
            "chars": ours.chars,
            "ours": ours.row(),
            "sp_default": default.row(),
            "byte_level": byte.row(),
            # > 0: we need more tokens per char than the default-settings tokenizer.
            "tokens_per_char_vs_default": ours.tokens / max(default.tokens, 1) - 1.0,
            # Like for like: ours on the text as sp-default sees it after its lossy NFKC/whitespace folding.
            "same_text_vs_default": _tokens_on_default_view(tok, base, docs) / max(default.tokens, 1) - 1.0,
        }
    return {
        "tokenizer": str(tok_dir),
        "digest": tok.digest,
        "vocab_size": tok.vocab_size,
        "corpus": str(corpus),
        "baseline_sample": base_stats,
        "languages": langs,
        "groups": group_rows(langs),
    }


def group_rows(langs: dict[str, dict]) -> dict[str, dict]:
    """Overall rows of the groups (`ko-ood` for `ko-ood.man`, ...): tokens and chars summed over members."""
    members: dict[str, list[str]] = {}
    for name in langs:
        if "." in name:
            members.setdefault(name.split(".", 1)[0], []).append(name)
    out = {}
    for group, names in members.items():
        chars = sum(langs[n]["chars"] for n in names)
        ours = sum(langs[n]["ours"]["tokens"] for n in names)
        default = sum(langs[n]["sp_default"]["tokens"] for n in names)
        worst = max(names, key=lambda n: langs[n]["tokens_per_char_vs_default"])
        out[group] = {
            "members": names,
            "chars": chars,
            "ours_tokens_per_char": ours / max(chars, 1),
            "sp_default_tokens_per_char": default / max(chars, 1),
            "tokens_per_char_vs_default": ours / max(default, 1) - 1.0,
            "worst_member": worst,
            "worst_member_vs_default": langs[worst]["tokens_per_char_vs_default"],
        }
    return out


def format_report(rep: dict) -> str:
    w = max(5, *(len(lang) for lang in rep["languages"]))
    lines = [
        f"tokenizer {rep['tokenizer']} (vocab {rep['vocab_size']}, digest {rep['digest'][:16]}...)",
        "baselines: byte-level (1 token per UTF-8 byte); sp-default = sentencepiece defaults trained on "
        f"{rep['corpus']} in natural proportions, same vocab and sample size",
        f"{'lang':<{w}} {'tokenizer':<11} {'tokens':>9} {'chars/tok':>9} {'tok/word':>9} {'bytes/tok':>9} "
        f"{'lossless':>8}",
    ]
    for lang, r in rep["languages"].items():
        for name in ("ours", "sp_default", "byte_level"):
            m = r[name]
            lines.append(
                f"{lang:<{w}} {name:<11} {m['tokens']:>9} {m['chars_per_token']:>9.3f} "
                f"{m['tokens_per_word']:>9.3f} {m['bytes_per_token']:>9.3f} {m['lossless']:>8.1%}"
            )
        delta = r["tokens_per_char_vs_default"]
        word = "fewer" if delta < 0 else "more"
        lines.append(
            f"{lang:<{w}} => ours uses {abs(delta):.1%} {word} tokens per char than sp-default "
            f"({r['docs']} docs, {r['chars']} chars); {r['same_text_vs_default']:+.1%} on the text as "
            "sp-default normalises it"
        )
    for group, g in rep.get("groups", {}).items():
        per = ", ".join(
            f"{n.split('.', 1)[1]} {rep['languages'][n]['tokens_per_char_vs_default']:+.1%}"
            for n in g["members"]
        )
        lines.append(
            f"{group} overall ({len(g['members'])} sources, {g['chars']} chars): ours "
            f"{g['ours_tokens_per_char']:.3f} tokens/char, sp-default {g['sp_default_tokens_per_char']:.3f}: "
            f"{g['tokens_per_char_vs_default']:+.1%}; per source: {per}"
        )
    return "\n".join(lines)

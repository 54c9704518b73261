"""The tokenizer's training text: the kept corpus, its held-out slice, weighted sampling into training sentences,
and the vocabulary that sample requires (checked before sentencepiece runs).

Pure functions over texts; data_prep/tokenizer.py trains on what `sample_corpus` returns.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path

from kmoe.configtree import ConfigError

log = logging.getLogger(__name__)

# A sentence ends at . ! ? (and their full-width forms) followed by spaces; the spaces go with the next sentence's
# dummy prefix. Newlines are left alone: line-wrapped text (DDTP) would be cut mid-sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])[ ]+")


def is_heldout(doc_id: str, frac: float) -> bool:
    """A deterministic `frac` of document ids (by sha256) that the tokenizer never trains on."""
    return frac > 0 and int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < frac


def read_kept_corpus(
    corpus_dir: Path, heldout_frac: float = 0.0, part: str = "train"
) -> dict[str, list[str]]:
    """Texts per language from `corpus_dir/kept/<lang>/*.jsonl.gz`, in file and line order. With
    `heldout_frac`, `part="train"` leaves out the held-out slice of documents (is_heldout) and
    `part="heldout"` returns only that slice."""
    corpus_dir = Path(corpus_dir)
    if not (corpus_dir / "kept").is_dir() and (corpus_dir / "corpus" / "kept").is_dir():
        corpus_dir = corpus_dir / "corpus"  # accept a `kmoe data build` OUT dir as well
    kept = corpus_dir / "kept"
    if not kept.is_dir():
        raise FileNotFoundError(f"{corpus_dir}: no kept/<lang>/*.jsonl.gz corpus (run `kmoe data build`)")
    texts: dict[str, list[str]] = {}
    for lang_dir in sorted(p for p in kept.iterdir() if p.is_dir()):
        for path in sorted(lang_dir.glob("*.jsonl.gz")):
            for doc_id, text in _read_shard(path, lang_dir.name):
                if is_heldout(doc_id, heldout_frac) == (part == "heldout"):
                    texts.setdefault(lang_dir.name, []).append(text)
    if not texts:
        raise FileNotFoundError(f"{kept}: no <lang>/*.jsonl.gz shards ({part} part)")
    return texts


def _read_shard(path: Path, lang: str) -> list[tuple[str, str]]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string 'text'")
            if doc.get("lang", lang) != lang:
                raise ValueError(f"{path}:{n}: lang {doc.get('lang')!r} in the '{lang}' folder")
            out.append((str(doc.get("id", f"{path.name}:{n}")), doc["text"]))
    return out


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Cut a document at line ends into training sentences of at most `max_chars` (newlines kept)."""
    chunks, buf = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a very long line: hard cut, rare (minified code, tables)
            if buf:
                chunks.append(buf)
                buf = ""
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if len(buf) + len(line) > max_chars and buf:
            chunks.append(buf)
            buf = ""
        buf += line
    if buf:
        chunks.append(buf)
    return [c for c in chunks if c.strip()]


def split_sentences(chunk: str) -> list[str]:
    """Training sentences of a natural-language chunk: sentencepiece never merges across them, so with
    `split_by_whitespace: false` a piece may span words ("할▁수▁있습니다.", "▁of▁the") but not two sentences
    ("다.▁이", "s.▁The"). The spaces between sentences become the next one's dummy prefix, as in the text."""
    return [s for s in _SENTENCE_END.split(chunk) if s.strip()]


def sample_corpus(texts: dict[str, list[str]], weights: dict[str, float] | None, total_chars: int, cfg):
    """Deterministic sample of training sentences (list, stats); `weights=None` keeps the corpus's natural
    proportions. `cfg`: a TokenizerConfig (seed, chunk_chars, max_upsample, sentence_split)."""
    avail = {lang: sum(map(len, docs)) for lang, docs in texts.items()}
    if weights is None:
        weights = {lang: float(n) for lang, n in avail.items()}
    else:
        unweighted = sorted(set(texts) - set(weights))
        if unweighted:
            raise ConfigError(
                f"tokenizer.language_weights: corpus has language(s) {unweighted} with no weight"
            )
        missing = sorted(lang for lang, w in weights.items() if w > 0 and lang not in texts)
        if missing:
            log.warning("tokenizer: no corpus text for weighted language(s) %s; renormalising", missing)
        weights = {lang: w for lang, w in weights.items() if lang in texts}
    norm = sum(weights.values())
    rng = random.Random(cfg.seed)
    sentences, stats = [], {}
    for lang in sorted(texts):
        target = int(total_chars * weights[lang] / norm)
        # Repeat a scarce language (bounded) rather than let a big one crowd it out of the vocabulary.
        budget = min(target, int(avail[lang] * cfg.max_upsample))
        split = cfg.sentence_split and lang != "code"
        order = list(range(len(texts[lang])))
        taken = 0
        while taken < budget:
            rng.shuffle(order)
            before = taken
            for i in order:
                if taken >= budget:
                    break
                pieces = chunk_document(texts[lang][i], cfg.chunk_chars)
                taken += sum(map(len, pieces))
                sentences.extend([s for p in pieces for s in split_sentences(p)] if split else pieces)
            if taken == before:  # nothing but whitespace in this language
                break
        stats[lang] = {"available_chars": avail[lang], "target_chars": target, "sampled_chars": taken}
    return sentences, stats


def required_characters(sentences: list[str], coverage: float, required: str = "") -> int:
    """How many characters sentencepiece keeps as pieces (its `required_chars_`): walking the `required` ones
    first, then the others by falling frequency, every character until `coverage` of all character occurrences
    is reached. Spaces count as U+2581, as sentencepiece sees them."""
    counts: Counter[str] = Counter()
    for s in sentences:
        counts.update(s)
    counts["\u2581"] += counts.pop(" ", 0) + len(sentences)  # the dummy prefix of every sentence
    total = sum(counts.values())
    forced = set(required)
    order = sorted(
        ((c in forced, counts.get(c, 0)) for c in forced | set(counts)), key=lambda key: key, reverse=True
    )
    kept = acc = 0
    for _, n in order:
        if acc >= coverage * total:
            break
        acc += n
        kept += 1
    return kept

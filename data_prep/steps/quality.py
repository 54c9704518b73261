"""Quality filters with Korean-aware heuristics; every threshold comes from `quality:` in the data config.

Natural language: length, script share (Hangul for ko), duplicate lines, character 4-gram repetition (catches
"ㅋㅋㅋㅋ" and copy-paste spam, which whitespace-word statistics miss in Korean), share of lines that end a
sentence (punctuation or a Korean sentence ending such as -다/-요), and a spam word list.
Code: length and maximum line length only.
"""

from __future__ import annotations

import re
from collections import Counter

from data_prep.config import QualityConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts
from data_prep.steps.scripts import SCRIPT_SHARE

# Korean declaratives/questions often end without punctuation in informal or list-like text.
_TERMINAL = re.compile(r"([.!?。！？…:;\"'”’)\]」』]|[다요까죠음함임됨니])$")


def dup_line_frac(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return 0.0
    counts = Counter(lines)
    return sum(c for c in counts.values() if c > 1) / len(lines)


def top_ngram_frac(text: str, n: int = 4, max_chars: int = 50_000) -> float:
    """Share of characters covered by the most frequent character n-gram (counted with overlap); long
    documents are judged on their first `max_chars` characters (repetition spam shows up early)."""
    s = re.sub(r"\s+", "", text[:max_chars])
    if len(s) < n * 5:
        return 0.0
    counts = Counter(s[i : i + n] for i in range(len(s) - n + 1))
    return min(1.0, counts.most_common(1)[0][1] * n / len(s))


def terminal_line_frac(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return 0.0
    return sum(1 for ln in lines if _TERMINAL.search(ln)) / len(lines)


def spam_per_kchar(text: str, words: list[str]) -> float:
    low = text.lower()
    hits = sum(low.count(w.lower()) for w in words)
    return hits * 1000 / max(len(text), 1)


def quality_reason(text: str, lang: str, cfg: QualityConfig) -> str:
    """The first failed filter's name, or '' when the document passes."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if lang == "code":
        if max((len(ln) for ln in text.split("\n")), default=0) > cfg.code_max_line_chars:
            return "code_long_line"
        return ""
    share = cfg.min_script_share.get(lang)
    if share is not None and SCRIPT_SHARE[lang](text) < share:
        return "script_share"
    if dup_line_frac(text) > cfg.max_dup_line_frac:
        return "dup_lines"
    if top_ngram_frac(text) > cfg.max_top_ngram_frac:
        return "repetition"
    if terminal_line_frac(text) < cfg.min_terminal_line_frac:
        return "no_sentence_ends"
    if spam_per_kchar(text, cfg.spam_words) > cfg.max_spam_per_kchar:
        return "spam_words"
    return ""


class QualityStep(DocStep):
    name = "quality"

    def __init__(self, out_dir, cfg: QualityConfig):
        super().__init__(out_dir)
        self.cfg = cfg

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        reason = quality_reason(doc.text, doc.lang, self.cfg)
        return Drop(reason) if reason else doc

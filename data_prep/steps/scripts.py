"""Script shares over letters (pure functions): how much of a text is Hangul, Japanese script or Latin."""

from __future__ import annotations

import re

_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
_LATIN = re.compile(r"[A-Za-z\u00c0-\u024f]")
_LETTER = re.compile(r"[^\W\d_]")


def _share(pattern: re.Pattern, text: str) -> float:
    letters = len(_LETTER.findall(text))
    return len(pattern.findall(text)) / letters if letters else 0.0


def hangul_share(text: str) -> float:
    return _share(_HANGUL, text)


def japanese_share(text: str) -> float:
    """Kana plus Han: Japanese prose mixes both."""
    letters = len(_LETTER.findall(text))
    if not letters:
        return 0.0
    return (len(_KANA.findall(text)) + len(_HAN.findall(text))) / letters


def latin_share(text: str) -> float:
    return _share(_LATIN, text)


SCRIPT_SHARE = {"ko": hangul_share, "ja": japanese_share, "en": latin_share}

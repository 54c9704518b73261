"""Small self-written multilingual corpus in the kept-corpus layout, for fast tokenizer tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

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

"""Byte-level Megatron shards from short texts: the data of tests and CPU smoke runs.

Token id = UTF-8 byte (0..255); 256 = EOD, 257 = pad, 258 = bos. Written with megatron-core's own
IndexedDatasetBuilder, plus the manifest.json and tokenizer/kmoe_tokenizer.json a real build has.
The texts are short sentences written for kmoe (no third-party text).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kmoe.hashing import sha256_file, sha256_json

EOD, PAD, BOS = 256, 257, 258
VOCAB = 259

TEXTS = {
    "ko": [
        "오늘은 날씨가 맑아서 공원에 산책을 나갔다.",
        "한국어 모델은 조사와 어미를 잘 배워야 한다.",
        "우리는 작은 모델을 처음부터 학습시킨다.",
        "도서관에서 책을 빌려 읽고 주말에 돌려주었다.",
        "김치찌개를 끓이려면 잘 익은 김치가 필요하다.",
    ],
    "en": [
        "The small model learns to predict the next byte.",
        "Every checkpoint carries a digest for each tensor.",
        "A resumed run must see exactly the same batches.",
        "Experts share the load when the router is balanced.",
        "We train from scratch on text we wrote ourselves.",
    ],
    "ja": [
        "今日は雨が降っているので家で本を読みます。",
        "小さなモデルを最初から学習させます。",
        "駅までは歩いて十分ほどかかります。",
        "日本語の文は助詞で意味がつながります。",
    ],
    "code": [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)\n",
        "import os\npath = os.path.join('a', 'b')\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    ],
}


def documents(lang: str, n_docs: int, seed: int = 0) -> list[list[int]]:
    """`n_docs` documents of 1-3 sentences each, byte-encoded, EOD appended."""
    rng = np.random.default_rng(seed + sum(lang.encode()))
    pool = TEXTS[lang]
    docs = []
    for _ in range(n_docs):
        picks = rng.integers(0, len(pool), size=int(rng.integers(1, 4)))
        text = " ".join(pool[i] for i in picks)
        docs.append(list(text.encode("utf-8")) + [EOD])
    return docs


def write_toy_shards(out: str | Path, n_docs: int = 200, langs: tuple[str, ...] = ("ko", "en", "ja", "code"),
                     seed: int = 0, parts: int = 1) -> Path:  # fmt: skip
    """Write `<out>/shards/<lang>.bin/.idx` (or, with `parts` > 1, `<lang>-<part>.bin/.idx` holding contiguous
    slices of the same documents), `<out>/manifest.json`, `<out>/tokenizer/kmoe_tokenizer.json`."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for lang in langs:
        docs = documents(lang, n_docs, seed)
        counts[lang] = {"documents": len(docs), "tokens": sum(map(len, docs))}
        for p in range(parts):
            name = lang if parts == 1 else f"{lang}-{p:05d}"
            prefix = out / "shards" / name
            builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
            for doc in docs[p * len(docs) // parts : (p + 1) * len(docs) // parts]:
                builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
            builder.finalize(str(prefix) + ".idx")
            for suffix in (".bin", ".idx"):
                files[f"shards/{name}{suffix}"] = sha256_file(str(prefix) + suffix)
    tok = out / "tokenizer"
    tok.mkdir(exist_ok=True)
    tok_info = {
        "special_ids": {"eos": EOD, "pad": PAD, "bos": BOS},
        "config": {"kind": "bytes", "vocab_size": VOCAB},
    }
    tok_info["digest"] = sha256_json(tok_info)
    (tok / "kmoe_tokenizer.json").write_text(json.dumps(tok_info, indent=1))
    manifest = {"files": files, "languages": counts, "tokenizer": tok_info["digest"]}
    manifest["root_hash"] = sha256_json(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return out

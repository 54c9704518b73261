"""Documents flowing between steps, and deterministic gzip JSONL files (same input -> same bytes)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    """One document. `raw` holds undecoded bytes until the decode step; `order` sorts docs globally."""

    id: str
    source: str
    order: tuple[int, int, int]  # (source index, file index, record index): independent of task count
    text: str = ""
    lang: str = ""  # ko | en | ja | code once known
    raw: bytes | None = None
    kind: str = "str"  # jsonl | text | str: how `raw` must be decoded
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The corpus contract: {"id", "text", "lang", "source"}."""
        return {"id": self.id, "text": self.text, "lang": self.lang, "source": self.source}

    def to_json(self) -> dict[str, Any]:
        return {**self.record(), "order": list(self.order), "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Doc:
        return cls(
            id=d["id"],
            source=d["source"],
            order=tuple(d["order"]),
            text=d["text"],
            lang=d["lang"],
            meta=d.get("meta", {}),
        )


class JsonlGzWriter:
    """gzip JSONL with mtime 0 and no embedded file name, so equal records give equal bytes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True) + "\n"
        self._gz.write(line.encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        self._gz.close()
        self._raw.close()
        self._tmp.replace(self.path)  # atomic: a killed task never leaves a half file under the final name


def read_jsonl_gz(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_json(path: Path, obj: Any) -> None:
    """Pretty, sorted, newline-terminated JSON (deterministic bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)

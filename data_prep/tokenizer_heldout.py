"""Out-of-domain Korean held-out text: registry sources that no kmoe tokenizer trains on.

The demo data corpus (configs/data/demo.yaml) and the tokenizer dev corpus take their Korean from DDTP package
descriptions, the LibreOffice help, the Debian FAQ and the GNOME/MATE user help. The sets here come from other
Debian packages, fetched at run time through the `demo` source's fetchers (cached in `.cache/data/debs`, never
committed), so the report measures Korean the tokenizer has never seen:
  ko-ood.gimp        gimp-help-ko: GIMP manual (HTML; mostly untranslated, Korean paragraphs only)
  ko-ood.install     installation-guide-amd64: the Debian installation guide, Korean HTML
  ko-ood.gnome-devel gnome-devel-docs: GNOME developer documentation (Mallard), Korean pages
  ko-ood.man         Korean man pages shipped in xz-utils, man-db, psmisc, passwd, login, lxc (groff)
  ko-ood.mo          Korean gettext catalogues (.mo) of coreutils, apt, shadow, man-db, xz (UI strings)
  ko-ood.tutorial    the vim tutor and the Emacs tutorial in Korean
Paragraphs of at least 10 characters whose letters are at least 30% Hangul are kept, normalised as the data
pipeline normalises the corpus the tokenizer trains on (data_prep/steps/normalize.py: NFC, runs of spaces and
tabs collapsed, trailing spaces dropped), so the figures describe text as training will see it.
"""

from __future__ import annotations

import gettext
import gzip
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from data_prep.config import NormalizeConfig
from data_prep.sources.demo import fetch_deb
from data_prep.sources.markup import groff_to_text, html_to_text
from data_prep.steps.normalize import normalize_text
from data_prep.steps.scripts import hangul_share

log = logging.getLogger(__name__)

MAN_PACKAGES = ("xz-utils", "man-db", "psmisc", "passwd", "login", "lxc")
MO_PACKAGES = ("coreutils", "apt", "login", "man-db", "xz-utils")
HELDOUT_VERSION = 2  # bump when an extractor changes, so cached files are rebuilt


def paragraphs(text: str) -> Iterator[str]:
    """Korean paragraphs (split at blank lines) of a page."""
    for para in text.split("\n\n"):
        para = normalize_text(para, NormalizeConfig())
        if len(para) >= 10 and hangul_share(para) >= 0.3:
            yield para


def _pages(root: Path, pattern: str, to_text: Callable[[str], str]) -> Iterator[str]:
    for path in sorted(root.glob(pattern)):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        yield from paragraphs(to_text(raw.decode("utf-8", errors="replace")))


def _gimp(cache: Path) -> Iterator[str]:
    yield from _pages(fetch_deb(cache, "gimp-help-ko"), "usr/share/gimp/2.0/help/ko/**/*.html", html_to_text)


def _install(cache: Path) -> Iterator[str]:
    root = fetch_deb(cache, "installation-guide-amd64")
    yield from _pages(root, "usr/share/doc/installation-guide-amd64/ko/*.html", html_to_text)


def _gnome_devel(cache: Path) -> Iterator[str]:
    yield from _pages(fetch_deb(cache, "gnome-devel-docs"), "usr/share/help/ko/**/*.page", html_to_text)


def _man(cache: Path) -> Iterator[str]:
    for pkg in MAN_PACKAGES:
        yield from _pages(fetch_deb(cache, pkg), "usr/share/man/ko/**/*.gz", groff_to_text)


def _mo(cache: Path) -> Iterator[str]:
    """Translated messages (msgstr) of each catalogue; a catalogue is one message per paragraph."""
    for pkg in MO_PACKAGES:
        for path in sorted(fetch_deb(cache, pkg).glob("usr/share/locale/ko/LC_MESSAGES/*.mo")):
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr; the one parsed view
            for key, msg in sorted(catalog.items(), key=lambda kv: str(kv[0])):
                if key and isinstance(msg, str) and hangul_share(msg) > 0:
                    yield normalize_text(msg, NormalizeConfig())


def _tutorial(cache: Path) -> Iterator[str]:
    vim = fetch_deb(cache, "vim-runtime")
    for path in sorted(vim.glob("usr/share/vim/vim*/tutor/tutor.ko.utf-8")):
        yield from paragraphs(path.read_text(encoding="utf-8"))
    emacs = fetch_deb(cache, "emacs-common")
    for path in sorted(emacs.glob("usr/share/emacs/*/etc/tutorials/TUTORIAL.ko")):
        yield from paragraphs(path.read_text(encoding="utf-8", errors="replace"))


SOURCES: dict[str, Callable[[Path], Iterator[str]]] = {
    "gimp": _gimp,
    "install": _install,
    "gnome-devel": _gnome_devel,
    "man": _man,
    "mo": _mo,
    "tutorial": _tutorial,
}
# Debian packages the sets are read from: none of them feeds a kmoe training corpus.
PACKAGES = sorted(
    {"gimp-help-ko", "installation-guide-amd64", "gnome-devel-docs", "vim-runtime", "emacs-common",
     *MAN_PACKAGES, *MO_PACKAGES}
)  # fmt: skip


def ensure_heldout_ko(out: Path, cache: Path) -> list[Path]:
    """Write `out/ko-ood.<source>.txt` (paragraphs separated by blank lines) once; return the files."""
    out = Path(out)
    marker = out / "done.json"
    files = [out / f"ko-ood.{name}.txt" for name in SOURCES]
    if marker.is_file() and json.loads(marker.read_text()).get("version") == HELDOUT_VERSION:
        return files
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for (name, extract), path in zip(SOURCES.items(), files):
        paras = list(dict.fromkeys(p for p in extract(Path(cache)) if p))  # exact repeats once
        path.write_text("\n\n".join(p.replace("\n\n", "\n") for p in paras) + "\n", encoding="utf-8")
        counts[name] = {"paragraphs": len(paras), "chars": sum(map(len, paras))}
        log.info("held-out Korean %s: %d paragraphs, %d chars", name, len(paras), counts[name]["chars"])
    marker.write_text(json.dumps({"version": HELDOUT_VERSION, "sources": counts}, indent=1) + "\n")
    return files

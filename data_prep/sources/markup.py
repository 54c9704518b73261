"""Markup to plain text for the demo sources: HTML help pages and groff man pages (stdlib only)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

# Mallard <info> and DocBook *info blocks hold credits (names, e-mails) and metadata, not prose.
_SKIP = set(
    [
        "script",
        "style",
        "head",
        "header",
        "nav",
        "footer",
        "noscript",
        "select",
        "button",
        "info",
        "articleinfo",
        "bookinfo",
        "sectioninfo",
        "legalnotice",
    ]
)
_BLOCK = set(
    [
        "p",
        "div",
        "br",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "tr",
        "pre",
        "dt",
        "dd",
        "table",
        "section",
        "title",
        "item",
        "para",
        "listitem",
        "note",
        "screen",
        "code",
        "desc",
    ]
)


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _Text()
    p.feed(html)
    p.close()
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in "".join(p.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[+-]?\d"), ""),
    (re.compile(r"\\\((em|en)"), "—"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&|^%]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
]
_FONT_MACROS = {"B", "I", "BI", "BR", "IR", "RB", "RI", "IB", "SM", "SB"}
_BREAK_MACROS = {"PP", "LP", "P", "TP", "IP", "br", "sp", "HP", "RS", "RE", "nf", "fi"}


def _unescape(s: str) -> str:
    for pat, rep in _ESCAPES:
        s = pat.sub(rep, s)
    return s


def groff_to_text(src: str) -> str:
    """Keep the prose of a man page: section titles, font-macro arguments and text lines."""
    out: list[str] = []
    for line in src.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].partition(" ")
            args = _unescape(args.replace('"', "")).strip()
            if macro in ("SH", "SS"):
                out += ["", args, ""]
            elif macro in _FONT_MACROS:
                out.append(args)
            elif macro in _BREAK_MACROS:
                out.append("" if macro in ("PP", "LP", "P", "sp") else "\n")
                if macro == "IP" and args:
                    out.append(args.split(" ")[0])
            continue
        out.append(_unescape(line))
    text = "\n".join(out)
    text = re.sub(r"(?<=\S)\n(?=\S)", " ", text)  # rejoin filled text lines into paragraphs
    return re.sub(r"\n{3,}", "\n\n", text).strip()

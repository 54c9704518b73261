"""PII scrubbing with Korean patterns. Each match is validated before it is replaced, counted per kind.

- rrn: resident registration number YYMMDD-GNNNNNN, with a real date (century from G) and the mod-11 checksum
- phone: mobile 010/011/016-019 and landline (02, 0NN, 070) numbers, optional +82
- brn: business registration number NNN-NN-NNNNN with its checksum
- card: 13-19 digit card numbers (spaces/dashes allowed) passing Luhn
- email, ip (public IPv4 only: private/reserved ranges and version-like numbers are left alone)
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Callable

from data_prep.config import PiiConfig
from data_prep.records import Doc
from data_prep.steps.base import DocStep, Drop, StepCounts

PLACEHOLDER = {
    "rrn": "<|rrn|>",
    "phone": "<|phone|>",
    "brn": "<|brn|>",
    "card": "<|card|>",
    "email": "<|email|>",
    "ip": "<|ip|>",
}
_NB = r"(?<![\d\w.])"  # not preceded by a digit, letter or a decimal point
_NA = r"(?![\d\w]|\.\d)"

PATTERNS: dict[str, re.Pattern] = {
    "rrn": re.compile(_NB + r"(\d{6})[- ]?([1-8]\d{6})" + _NA),
    # 4-4-4-4(-3) or Amex 4-6-5 groups with one consistent separator, or 13-19 digits unbroken.
    "card": re.compile(_NB + r"(\d{4}([ -]?)\d{4}\2\d{4}\2\d{1,7}|\d{4}([ -]?)\d{6}\3\d{5}|\d{13,19})" + _NA),
    "brn": re.compile(_NB + r"(\d{3})-(\d{2})-(\d{5})" + _NA),
    # One consistent separator (010-1234-5678, 02 123 4567), none (01012345678) or "(02) 123-4567";
    # mixed forms such as the ZIP+4 "02111-1307" or decimals "0.0224614952" are not phone numbers.
    "phone": re.compile(
        r"(?<![\d\w+.])(?:\+82[- ]?|0)(?:1[016789]|2|[3-6][1-5]|70)"
        r"(?:([- .])\d{3,4}\1\d{4}|\d{7,8}|\) ?\d{3,4}-\d{4})" + _NA
    ),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "ip": re.compile(_NB + r"((?:\d{1,3}\.){3}\d{1,3})" + r"(?![\d.]*\d)"),
}
# Order matters: an RRN or card is also digits that look like a phone number.
ORDER = ("email", "rrn", "card", "brn", "phone", "ip")


def valid_rrn(front: str, back: str) -> bool:
    digits = [int(c) for c in front + back]
    century = {1: 1900, 2: 1900, 5: 1900, 6: 1900, 3: 2000, 4: 2000, 7: 2000, 8: 2000}[digits[6]]
    try:
        datetime.date(century + int(front[:2]), int(front[2:4]), int(front[4:6]))
    except ValueError:
        return False
    weights = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
    check = (11 - sum(d * w for d, w in zip(digits, weights)) % 11) % 10
    return check == digits[12]


def valid_brn(a: str, b: str, c: str) -> bool:
    d = [int(x) for x in a + b + c]
    weights = (1, 3, 7, 1, 3, 7, 1, 3, 5)
    total = sum(x * w for x, w in zip(d, weights)) + (d[8] * 5) // 10
    return (10 - total % 10) % 10 == d[9]


def luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def valid_ip(s: str) -> bool:
    """A public IPv4 address. Private, loopback, link-local, multicast and documentation ranges identify no
    person; dotted numbers with fewer than two octets >= 10 are nearly always section or version numbers
    ("8.2.2.1", "7.4.1.2") rather than hosts."""
    parts = s.split(".")
    if not all(p.isdigit() and int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts):
        return False
    if sum(int(p) >= 10 for p in parts) < 2:
        return False
    addr = ipaddress.ip_address(s)
    return addr.is_global and not addr.is_multicast


VALIDATORS: dict[str, Callable[[re.Match], bool]] = {
    "rrn": lambda m: valid_rrn(m.group(1), m.group(2)),
    "card": lambda m: luhn(m.group(1)),
    "brn": lambda m: valid_brn(m.group(1), m.group(2), m.group(3)),
    "phone": lambda m: True,
    "email": lambda m: True,
    "ip": lambda m: valid_ip(m.group(1)),
}


def scrub(text: str, kinds: list[str]) -> tuple[str, dict[str, int]]:
    """Replace validated PII with placeholders; returns the new text and counts per kind."""
    counts: dict[str, int] = {}
    for kind in ORDER:
        if kind not in kinds:
            continue
        n = 0

        def repl(m: re.Match, kind=kind) -> str:
            nonlocal n
            if VALIDATORS[kind](m):
                n += 1
                return PLACEHOLDER[kind]
            return m.group(0)

        text = PATTERNS[kind].sub(repl, text)
        if n:
            counts[kind] = n
    return text, counts


class PiiStep(DocStep):
    name = "pii"

    def __init__(self, out_dir, cfg: PiiConfig):
        super().__init__(out_dir)
        unknown = set(cfg.kinds) - set(PLACEHOLDER)
        if unknown:
            raise ValueError(f"pii.kinds: unknown kind(s) {sorted(unknown)}; known: {sorted(PLACEHOLDER)}")
        self.cfg = cfg

    def apply(self, doc: Doc, counts: StepCounts) -> Doc | Drop:
        if doc.lang == "code" and not self.cfg.apply_to_code:
            return doc
        doc.text, found = scrub(doc.text, self.cfg.kinds)
        for kind, n in found.items():
            counts.notes[f"pii:{kind}"] += n
        if found:
            counts.notes["docs_with_pii"] += 1
        return doc

"""PII detection with Korean patterns (pure functions). Each match is validated before it counts.

- rrn: resident registration number YYMMDD-GNNNNNN, with a real date (century from G) and the mod-11 checksum
- phone: mobile 010/011/016-019 and landline (02, 0NN, 070) numbers, optional +82
- brn: business registration number NNN-NN-NNNNN with its checksum
- card: 13-19 digit card numbers (spaces/dashes allowed) passing Luhn, with a card-network first digit
- email: an address whose top-level domain is a real one (`x@self.weight` in code is not an address); not the
  `user@host:path` of an scp/git remote nor the user part of a URL (`ssh://git@host/...`) when that user is a
  service account (git, hg, root, deploy, ...); a person's login there (`ssh://kim.minsu@host/`) is redacted
- ip: public IPv4 only (private/reserved ranges and version-like numbers are left alone), and not a dotted
  section or version number: not at the start of a heading line (`12.10.2.1. 新しい言語の追加方法`), not after
  a version/section word (`version`, `버전`, `バージョン`, `§`) or before a section suffix (`절`, `章`, `項`);
  a CIDR network prefix (`203.97.2.0/24`) is a network, not an address

`context=False` turns the context rules off (the card first digit, the email and ip conditions after the format
and checksum checks): what the detector did before them, kept so bench/pii_precision.py can measure what they
change.
"""

from __future__ import annotations

import bisect
import datetime
import ipaddress
import re
from collections.abc import Callable

PLACEHOLDER = {
    "rrn": "<|rrn|>",
    "phone": "<|phone|>",
    "brn": "<|brn|>",
    "card": "<|card|>",
    "email": "<|email|>",
    "ip": "<|ip|>",
}
KINDS = tuple(PLACEHOLDER)
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
        r"(?<![\d\w+.])(?:\(0(?:1[016789]|2|[3-6][1-5]|70)\) ?\d{3,4}-\d{4}"
        r"|(?:\+82[- ]?|0)(?:1[016789]|2|[3-6][1-5]|70)(?:([- .])\d{3,4}\1\d{4}|\d{7,8}))" + _NA
    ),
    "email": re.compile(
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z]{2,})(?![A-Za-z0-9])"
    ),
    "ip": re.compile(_NB + r"((?:\d{1,3}\.){3}\d{1,3})" + r"(?![\d.]*\d)"),
}
# Order matters: an RRN or card is also digits that look like a phone number; the first kind claims the span.
ORDER = ("email", "rrn", "card", "brn", "phone", "ip")

# Generic top-level domains seen in addresses; any two-letter one is a country code (kr, jp, io, ...).
GENERIC_TLDS = frozenset([
    "com", "net", "org", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "mobi", "asia", "tel",
    "travel", "jobs", "coop", "aero", "museum", "xyz", "top", "site", "online", "shop", "store", "app",
    "dev", "cloud", "tech", "email", "club", "live", "life", "space", "website", "blog", "news", "page",
    "link", "kim", "seoul", "tokyo", "work", "global", "design", "agency", "company", "group", "center",
    "studio", "solutions", "services", "ninja", "zone", "team", "systems", "network", "digital", "media",
    "world", "today", "social", "academy", "school",
])  # fmt: skip
# Logins of remotes and URLs that name a service, not a person (git@github.com:org/repo.git).
SERVICE_USERS = frozenset([
    "git", "hg", "svn", "ssh", "sftp", "ftp", "anonymous", "anon", "guest", "root", "admin", "administrator",
    "user", "username", "login", "deploy", "ubuntu", "debian", "centos", "ec2-user", "www-data", "nobody",
    "postgres", "mysql", "jenkins", "build", "ci", "backup", "web", "www", "mail", "test",
])  # fmt: skip
_LINE_LEAD = re.compile(r"(?:^|\n)[ \t]*(?:[#*>+-][ \t]*)*\Z")  # only heading/list markers before the match
_HEADING_TAIL = re.compile(r"(?:[.)][ \t]*(?:$|\n|[^\W\d_])|[ \t]+[^\W\d_a-z])")
_VERSION_WORD = re.compile(
    r"(?:(?i:\b(?:v|ver|version|versions|release|rel|rev|revision|build|firmware|fw|section|sec|sect|"
    r"chapter|ch|clause|step|oid))\.?|§|버전|릴리스|릴리즈|섹션|バージョン|リリース|版|第|章|節)[ \t:#]*\Z"
)
_SECTION_SUFFIX = re.compile(r"(?:절|장|항|조|번째|章|節|項|条|版)")


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


def ip_is_address(text: str, start: int, end: int) -> bool:
    """False when the dotted number reads as a section or version number in its context."""
    if _LINE_LEAD.search(text, max(0, start - 40), start) and _HEADING_TAIL.match(text, end):
        return False  # "12.10.2.1. 新しい言語の追加方法", "12.10.2.1 Installing" at the start of a line
    if _VERSION_WORD.search(text, max(0, start - 24), start):
        return False
    if re.match(r"/\d", text[end : end + 2]):
        return False  # a CIDR network prefix (203.97.2.0/24), not one host
    return not _SECTION_SUFFIX.match(text, end)


def email_is_address(text: str, start: int, end: int, tld: str) -> bool:
    if tld.lower() not in GENERIC_TLDS and len(tld) != 2:
        return False  # code: `x@self.weight`, `user@localhost.localdomain`
    remote = re.match(r":[\w~/.$-]", text[end : end + 2]) or text[max(0, start - 3) : start] == "://"
    # user@host:path (scp, git) or scheme://user@host: a login, not an address -- unless the login names a
    # person (`ssh://kim.minsu@host/`), which stays redacted.
    return not (remote and text[start:end].split("@", 1)[0].lower() in SERVICE_USERS)


VALIDATORS: dict[str, Callable[[re.Match], bool]] = {
    "rrn": lambda m: valid_rrn(m.group(1), m.group(2)),
    "card": lambda m: luhn(m.group(1)),
    "brn": lambda m: valid_brn(m.group(1), m.group(2), m.group(3)),
    "phone": lambda m: True,
    "email": lambda m: True,
    "ip": lambda m: valid_ip(m.group(1)),
}
CONTEXT: dict[str, Callable[[re.Match], bool]] = {
    "card": lambda m: m.group(1)[0] in "234569",  # Amex/Diners/JCB 3, Visa 4, MC 2/5, 6, Korean domestic 9
    "email": lambda m: email_is_address(m.string, m.start(), m.end(), m.group(1)),
    "ip": lambda m: ip_is_address(m.string, m.start(1), m.end(1)),
}


def find_pii(text: str, kinds, context: bool = True) -> list[tuple[int, int, str]]:
    """Validated, non-overlapping (start, end, kind) spans in text order; earlier kinds in ORDER win."""
    starts: list[int] = []
    spans: list[tuple[int, int, str]] = []
    for kind in ORDER:
        if kind not in kinds:
            continue
        for m in PATTERNS[kind].finditer(text):
            s, e = m.span()
            i = bisect.bisect_right(starts, s)
            if (i and spans[i - 1][1] > s) or (i < len(spans) and spans[i][0] < e):
                continue  # inside a span an earlier kind claimed
            if not VALIDATORS[kind](m) or (context and kind in CONTEXT and not CONTEXT[kind](m)):
                continue
            starts.insert(i, s)
            spans.insert(i, (s, e, kind))
    return spans


def scrub(text: str, kinds) -> tuple[str, dict[str, int]]:
    """Replace validated PII with placeholders; returns the new text and counts per kind."""
    spans = find_pii(text, kinds)
    if not spans:
        return text, {}
    out, pos, counts = [], 0, {}
    for s, e, kind in spans:
        out += [text[pos:s], PLACEHOLDER[kind]]
        pos = e
        counts[kind] = counts.get(kind, 0) + 1
    out.append(text[pos:])
    return "".join(out), counts

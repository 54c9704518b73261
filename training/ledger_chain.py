"""Reading a ledger back: lines, the hash chain walk and signature checks (shared by writer and auditor)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kmoe.hashing import sha256_bytes, sha256_json

FORMAT = "kmoe-ledger/1"
LEDGER_FILE = "ledger.jsonl"
GENESIS_PREV = "0" * 64
SIG_DOMAIN = b"kmoe-ledger/1 head "


class LedgerError(ValueError):
    """The ledger file or its key cannot be used as asked (message names the file, line or record)."""


# ---------------------------------------------------------------- reading


@dataclass
class Line:
    lineno: int  # 1-based
    raw: bytes  # without the newline
    terminated: bool  # False only for a last line with no newline (a torn write)
    record: dict[str, Any] | None = None  # None when the line is not a JSON object


@dataclass
class Chain:
    """The result of walking a ledger: valid records in order, accepted torn lines, and findings."""

    records: list[tuple[Line, dict[str, Any]]] = field(default_factory=list)
    torn: list[tuple[Line, dict[str, Any]]] = field(default_factory=list)  # (torn line, its torn_tail event)
    findings: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return record_hash(self.records[-1][1]) if self.records else GENESIS_PREV


def record_hash(record: Mapping[str, Any]) -> str:
    return sha256_json(record)


def key_id(public_key_hex: str) -> str:
    """Fingerprint of a raw Ed25519 public key: what auditors pin and compare."""
    return sha256_bytes(bytes.fromhex(public_key_hex))


def read_lines(path: str | Path) -> list[Line]:
    data = Path(path).read_bytes()
    parts = data.split(b"\n")
    lines = []
    for i, raw in enumerate(parts):
        last = i == len(parts) - 1
        if last and raw == b"":
            break
        line = Line(lineno=i + 1, raw=raw, terminated=not last)
        try:
            obj = json.loads(raw)
            line.record = obj if isinstance(obj, dict) else None
        except ValueError:
            line.record = None
        lines.append(line)
    return lines


def _torn_ok(line: Line, nxt: Line | None) -> bool:
    """A bad line is acceptable only when the very next record is a torn_tail event naming its bytes."""
    rec = nxt.record if nxt else None
    return bool(
        rec
        and rec.get("kind") == "event"
        and rec.get("event") == "torn_tail"
        and rec.get("torn_sha256") == sha256_bytes(line.raw)
        and rec.get("torn_line") == line.lineno
    )


def walk_chain(lines: Sequence[Line]) -> Chain:
    """Check seq numbering and the hash chain; every break is a finding naming the seq and line."""
    chain = Chain()
    expect_prev, expect_seq, before = GENESIS_PREV, 0, "none: this is the first record"
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        where = f"seq {expect_seq} (line {line.lineno})"
        if not line.terminated or line.record is None:
            if nxt is not None and _torn_ok(line, nxt):
                chain.torn.append((line, nxt.record or {}))
                continue
            what = (
                f"torn record: {len(line.raw)} bytes without a newline (file truncated mid-line)"
                if not line.terminated
                else "not a JSON object"
            )
            chain.findings.append(f"{where}: {what}, and no torn_tail event records it")
            continue
        rec = line.record
        if rec.get("seq") != expect_seq:
            chain.findings.append(
                f"{where}: record carries seq {rec.get('seq')!r}, expected {expect_seq} "
                "(a record was deleted, inserted or moved)"
            )
        if rec.get("prev") != expect_prev:
            chain.findings.append(
                f"{where}: prev hash does not match the hash of the record before it ({before}): "
                "one of the two was edited, or records between them were removed or reordered"
            )
        if expect_seq == 0 and rec.get("kind") != "genesis":
            chain.findings.append(f"{where}: the first record must be the genesis record")
        chain.records.append((line, rec))
        before = f"seq {rec.get('seq')}, line {line.lineno}"
        # resynchronise on the record's own seq so one deletion or swap is not reported at every later line
        seq = rec.get("seq")
        expect_prev, expect_seq = record_hash(rec), (seq if isinstance(seq, int) else expect_seq) + 1
    return chain


def verify_signature(public_key_hex: str, head: str, sig_hex: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(
            bytes.fromhex(sig_hex), SIG_DOMAIN + head.encode()
        )
        return True
    except (InvalidSignature, ValueError):
        return False


def genesis_key_id(path: Path) -> str:
    """The key id the genesis record (first line) of a ledger file names."""
    lines = read_lines(path)
    genesis = lines[0].record if lines else None
    if not genesis or genesis.get("kind") != "genesis" or not genesis.get("key_id"):
        raise LedgerError(f"{path}: line 1 is not a genesis record naming its key id; cannot continue it")
    return str(genesis["key_id"])

"""Artifact provenance: a manifest of sha256 digests of every file, the source's digest and the training ledger
head, signed with Ed25519.

Files written into the artifact:
  manifest.json      {"files": {relpath: sha256}, "source": {...}, "ledger_head": ..., "signer": {...}}
  manifest.sig       hex Ed25519 signature over canonical_json(manifest)
  signing_key.pub    the signer's public key (PEM), itself listed in the manifest
Key handling: `--key PATH` signs with the PEM private key at PATH (created, mode 0600, when absent); without
it an ephemeral key is generated and only its public half is kept, which proves the files match the manifest
but not who made it. `verify(..., pubkey=FILE)` pins the expected signer (PEM, or the raw hex public key
that training/ledger.py writes beside a run key, so an artifact can be signed with the run's ledger key).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kmoe.hashing import canonical_json, named_merkle_root, sha256_bytes, sha256_file, sha256_json

log = logging.getLogger(__name__)
MANIFEST, SIGNATURE, PUBKEY = "manifest.json", "manifest.sig", "signing_key.pub"
FORMAT = "kmoe-artifact-manifest/1"


class ArtifactError(ValueError):
    """An artifact whose files do not match its signed manifest."""


def load_or_create_key(path: str | Path | None):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path is None:
        return Ed25519PrivateKey.generate(), "ephemeral"
    path = Path(path)
    if path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ArtifactError(f"{path}: not an Ed25519 private key (PEM, unencrypted)")
        return key, str(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    log.info("created signing key %s", path)
    return key, str(path)


def _pub_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _raw_hex(pub) -> str:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_public_key(data: bytes):
    """A PEM public key, or the 64-hex-digit raw Ed25519 key the training ledger writes to `<key>.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = data.strip()
    if len(text) == 64 and all(c in b"0123456789abcdefABCDEF" for c in text):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
    return serialization.load_pem_public_key(data)


def source_digest(source: str | Path) -> dict:
    """A kmoe checkpoint's tensor Merkle root, or a Merkle root over an HF directory's file digests."""
    src = Path(source)
    digests = src / "digests.json"
    if digests.is_file():
        return {
            "path": str(src),
            "kind": "kmoe-checkpoint",
            "merkle_root": json.loads(digests.read_text())["merkle_root"],
        }
    files = {p.relative_to(src).as_posix(): sha256_file(p) for p in sorted(src.rglob("*")) if p.is_file()}
    return {"path": str(src), "kind": "hf-dir", "merkle_root": named_merkle_root(files), "files": files}


def ledger_head(source: str | Path) -> str | None:
    """sha256 of the canonical JSON of the last record of the run's ledger.jsonl (the `prev` the next record
    would carry, see training/ledger.py) when the source lives in a run dir (looked up to three levels up:
    runs/<name>/checkpoints/step-N/); None when there is none."""
    from kmoe.run_tokenizer import find_ledger

    ledger = find_ledger(source)
    if ledger is None:
        return None
    lines = [ln for ln in ledger.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for n, line in reversed(list(enumerate(lines, 1))):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: torn ledger line (crash mid-write); head is the record before it", ledger, n)
            continue
        return sha256_json(record)
    return None


def _file_digests(out: Path) -> dict[str, str]:
    skip = {MANIFEST, SIGNATURE}
    return {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.relative_to(out).as_posix() not in skip
    }


def sign_artifact(out_dir: str | Path, source: dict, ledger: str | None, key_path: str | Path | None) -> dict:
    """Write signing_key.pub, manifest.json and manifest.sig into `out_dir`; returns the manifest."""
    out = Path(out_dir)
    key, key_desc = load_or_create_key(key_path)
    pem = _pub_pem(key)
    (out / PUBKEY).write_bytes(pem)
    manifest = {
        "format": FORMAT,
        "files": _file_digests(out),
        "source": source,
        "ledger_head": ledger,
        "signer": {
            "algorithm": "ed25519",
            "public_key_sha256": sha256_bytes(pem),
            "public_key_hex": _raw_hex(key.public_key()),  # the form training/ledger.py prints
            "key": key_desc,
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    (out / SIGNATURE).write_text(key.sign(canonical_json(manifest)).hex() + "\n")
    return manifest


def verify_artifact(out_dir: str | Path, pubkey: str | Path | None = None) -> dict:
    """Check signature and every file digest; raises ArtifactError naming each file that does not match."""
    from cryptography.exceptions import InvalidSignature

    out = Path(out_dir)
    for name in (MANIFEST, SIGNATURE, PUBKEY):
        if not (out / name).is_file():
            raise ArtifactError(f"{out / name}: missing; not a signed kmoe artifact")
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        sig = bytes.fromhex((out / SIGNATURE).read_text().strip())
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{out}: {MANIFEST} or {SIGNATURE} is unreadable ({e})") from None
    pem = Path(pubkey).read_bytes() if pubkey else (out / PUBKEY).read_bytes()
    try:
        load_public_key(pem).verify(sig, canonical_json(manifest))
    except (InvalidSignature, ValueError):
        raise ArtifactError(
            f"{out}: signature check failed: {MANIFEST}, {SIGNATURE} or {PUBKEY} was changed"
            + (" (or the artifact was signed by another key)" if pubkey else "")
        ) from None
    actual = _file_digests(out)
    want = manifest["files"]
    bad = sorted(k for k in want if k in actual and actual[k] != want[k])
    missing = sorted(set(want) - set(actual))
    extra = sorted(set(actual) - set(want))
    if bad or missing or extra:
        parts = [f"changed: {bad}" if bad else "", f"missing: {missing}" if missing else ""]
        parts.append(f"not in manifest: {extra}" if extra else "")
        raise ArtifactError(f"{out}: " + "; ".join(p for p in parts if p))
    return manifest

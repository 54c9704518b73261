"""Where a run's Ed25519 signing key lives, and how a continued run finds it again: by the key id its ledger names.

A new run's key is `<key dir>/<key id>.ed25519` (mode 0600) with `<key id>.ed25519.pub` beside it. The key dir
is `--key-dir`, else `$KMOE_KEY_DIR`, else `<runs>/.keys` beside the run directory (never inside it: whoever
can rewrite the run must not hold its key). In that default dir the run's name also gets `<run>.ed25519.pub`,
the pin `kmoe audit verify` compares the genesis key with when no `--pubkey` is given.

A run that continues (resume, requeue) reads the key id from its genesis record and looks in the places
`key_candidates` lists, taking the first key whose public key has that id; so a run directory can be renamed,
copied or moved (with `--key-dir`/`$KMOE_KEY_DIR` when its `.keys` did not move with it). Keys of runs from before
key ids (`<runs>/.keys/<run>.ed25519`) are found the same way, whatever the run is called now.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .ledger_chain import LEDGER_FILE, LedgerError, genesis_key_id, key_id

KEY_DIR_ENV = "KMOE_KEY_DIR"
SUFFIX = ".ed25519"


def runs_key_dir(run_dir: str | Path) -> Path:
    """`<runs>/.keys`: beside the run directory."""
    return Path(run_dir).resolve().parent / ".keys"


def default_key_path(run_dir: str | Path) -> Path:
    """`<runs>/.keys/<run>.ed25519`: the key of a run from before key ids; its `.pub` is the run-name pin."""
    run_dir = Path(run_dir).resolve()
    return runs_key_dir(run_dir) / f"{run_dir.name}{SUFFIX}"


def configured_key_dir(key_dir: str | Path | None = None) -> Path | None:
    """`--key-dir`, else `$KMOE_KEY_DIR`, else None."""
    value = key_dir or os.environ.get(KEY_DIR_ENV)
    return Path(value).expanduser() if value else None


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    if not path.is_file():
        raise LedgerError(f"{path}: the run's signing key is missing; the ledger cannot be continued")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key")
    return key


def _write_key(path: Path, key: Ed25519PrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(str(path) + ".pub").write_text(public_hex(key) + "\n")


def create_key(
    run_dir: Path, key_path: str | Path | None = None, key_dir: str | Path | None = None
) -> tuple[Ed25519PrivateKey, Path]:
    """The key of a new run: `key_path` as given (used when it exists, created otherwise), else a new key
    named by its id in the key dir (and the run-name pin when that dir is the default `<runs>/.keys`)."""
    if key_path:
        path = Path(key_path).expanduser()
        if path.is_file():
            return load_private_key(path), path
        key = Ed25519PrivateKey.generate()
        _write_key(path, key)
        return key, path
    key = Ed25519PrivateKey.generate()
    folder = configured_key_dir(key_dir) or runs_key_dir(run_dir)
    path = folder / f"{key_id(public_hex(key))}{SUFFIX}"
    _write_key(path, key)
    if folder.resolve() == runs_key_dir(run_dir):
        Path(str(default_key_path(run_dir)) + ".pub").write_text(public_hex(key) + "\n")
    return key, path


def key_dirs(run_dir: Path, key_dir: str | Path | None = None) -> list[Path]:
    """Where a run's key is looked for, in order: the configured key dir, then `<runs>/.keys` beside the run."""
    dirs = [d for d in (configured_key_dir(key_dir), runs_key_dir(run_dir)) if d is not None]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _key_id_of(path: Path) -> str | None:
    """The key id of a key file, from its `.pub` when there is one (no private key parsed for nothing)."""
    pub = Path(str(path) + ".pub")
    try:
        return (
            key_id(pub.read_text().strip()) if pub.is_file() else key_id(public_hex(load_private_key(path)))
        )
    except (ValueError, OSError):
        return None


def find_key(
    run_dir: Path, kid: str, key_path: str | Path | None = None, key_dir: str | Path | None = None
) -> tuple[Ed25519PrivateKey, Path]:
    """The private key whose public key has id `kid` (the id the run's genesis names): `key_path` when given,
    else in each of `key_dirs` `<kid>.ed25519`, then any other `*.ed25519` (keys named by run)."""
    if key_path:
        path = Path(key_path).expanduser()
        key = load_private_key(path)
        if key_id(public_hex(key)) != kid:
            raise LedgerError(f"{path}: not the key named in the genesis record (key id {kid[:16]}...)")
        return key, path
    dirs = key_dirs(run_dir, key_dir)
    for folder in dirs:
        named = folder / f"{kid}{SUFFIX}"
        others = sorted(p for p in folder.glob(f"*{SUFFIX}") if p != named) if folder.is_dir() else []
        for path in [named, *others]:
            if path.is_file() and _key_id_of(path) == kid:
                key = load_private_key(path)
                if key_id(public_hex(key)) == kid:
                    return key, path
    where = " or ".join(str(d) for d in dirs)
    raise LedgerError(
        f"{run_dir}: the ledger's signing key (key id {kid[:16]}...) is not in {where} (looked for "
        f"<key id>{SUFFIX} and any *{SUFFIX} of that id); pass --key FILE or --key-dir DIR (or set ${KEY_DIR_ENV})"
    )


def check_run_key(
    run_dir: Path, key_path: str | Path | None = None, key_dir: str | Path | None = None
) -> None:
    """Raise LedgerError when `run_dir` holds a ledger whose signing key cannot be found (nothing when new)."""
    ledger = Path(run_dir) / LEDGER_FILE
    if ledger.is_file() and ledger.stat().st_size > 0:
        find_key(Path(run_dir), genesis_key_id(ledger), key_path, key_dir)

"""The training ledger: an append-only, hash-chained, Ed25519-signed record of one run (spec: docs/ledger.md).

Every record is one canonical-JSON line carrying `seq` and `prev` = sha256 of the previous record's
canonical encoding, so any edit, deletion, insertion or reordering breaks the chain. A per-run Ed25519 key
signs the chain head after every checkpoint and at the end; its public key is in the genesis record and the
private key lives outside the run directory (default `<runs>/.keys/<run>.ed25519`, mode 0600).

The trainer talks to it through `training.hooks.LedgerHook` (genesis, step, checkpoint, event, close); each call appends
one record, flushed and fsynced before it returns, so a crash loses at most the line being written, and that
torn line is kept and recorded on reopen (a `torn_tail` event), never dropped or repaired.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kmoe.hashing import (
    LEGACY_SCHEME,
    TENSOR_SCHEME,
    canonical_json,
    named_merkle_root,
    sha256_bytes,
    sha256_file,
    sha256_json,
    state_digests,
)

from . import ledger_facts
from .ledger_chain import (
    FORMAT,
    GENESIS_PREV,
    LEDGER_FILE,
    SIG_DOMAIN,
    key_id,
    read_lines,
    walk_chain,
)

log = logging.getLogger(__name__)


class LedgerError(ValueError):
    """The ledger file or its key cannot be used as asked (message names the file, line or record)."""


# ---------------------------------------------------------------- keys


def default_key_path(run_dir: str | Path) -> Path:
    """`<runs>/.keys/<run>.ed25519`: beside the run directory, never inside it."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / ".keys" / f"{run_dir.name}.ed25519"


def _new_key(path: Path) -> Ed25519PrivateKey:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LedgerError(
            f"{path}: a signing key already exists but the run has no ledger; remove it or name another key path"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(str(path) + ".pub").write_text(public_hex(key) + "\n")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    if not path.is_file():
        raise LedgerError(f"{path}: the run's signing key is missing; the ledger cannot be continued")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key")
    return key


# ---------------------------------------------------------------- writing


def jsonable(x: Any) -> Any:
    """Tensors/arrays to lists, numpy scalars to Python; non-finite floats as strings (JSON has no NaN)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def compact_indices(indices: Sequence[int]) -> dict[str, Any]:
    """A contiguous run of sample indices is stored as start/count, anything else as the full list."""
    idx = [int(i) for i in indices]
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return {"start": idx[0], "count": len(idx)}
    return {"list": idx}


def expert_load_stats(load_LE: Any) -> dict[str, Any]:
    """Per-expert token counts summed over MoE layers, and each layer's max/mean load ratio."""
    rows = [[float(v) for v in row] for row in jsonable(load_LE)]
    if not rows:
        return {"per_expert": [], "max_over_mean": []}
    per_expert = [int(round(sum(col))) for col in zip(*rows)]
    ratios = [round(max(r) / (sum(r) / len(r)), 4) if sum(r) > 0 else 0.0 for r in rows]
    return {"per_expert": per_expert, "max_over_mean": ratios}


def dir_file_digests(path: Path) -> dict[str, str]:
    """sha256 of every regular file under a checkpoint directory, by relative path."""
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Append-only writer of `RUN_DIR/ledger.jsonl`. Use `Ledger.open(run_dir)` for new and resumed runs.

    Args (of `open`):
        run_dir: the run directory; the ledger is `run_dir/ledger.jsonl`.
        key_path: the Ed25519 private key; default `default_key_path(run_dir)`, created for a new run.
        fsync: fsync after every record (survives power loss). With False every record is still flushed
            to the OS (survives a process crash) and fsync happens at each signature.
    """

    def __init__(self, path: Path, key: Ed25519PrivateKey, key_path: Path, fsync: bool = True):
        self.path, self.key, self.key_path, self.fsync = path, key, key_path, fsync
        self.public_key = public_hex(key)
        self.key_id = key_id(self.public_key)
        self.head, self.seq = GENESIS_PREV, 0
        self.resumed = False
        self.recorded: set[str] = set()  # checkpoint paths the ledger names (as recorded: run-dir relative)
        self._init_scheme = TENSOR_SCHEME
        self._f = None

    @classmethod
    def open(cls, run_dir: str | Path, key_path: str | Path | None = None, fsync: bool = True) -> Ledger:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LEDGER_FILE
        kp = Path(key_path) if key_path else default_key_path(run_dir)
        if kp.resolve().is_relative_to(run_dir.resolve()):
            log.warning("ledger signing key %s is inside the run directory, as configured", kp)
        existing = path.is_file() and path.stat().st_size > 0
        key = load_private_key(kp) if existing else _new_key(kp)
        led = cls(path, key, kp, fsync)
        if existing:
            led._reopen()
        led._f = open(path, "ab")  # noqa: SIM115 -- held open for the run, closed by close()
        if existing:
            led._record_torn_tail()
            if led._unsigned_checkpoint:  # died between a checkpoint record and its signature: sign it now
                led._sign(final=False)
        return led

    def _reopen(self) -> None:
        lines = read_lines(self.path)
        self._pending_torn = None
        if lines and (not lines[-1].terminated or lines[-1].record is None):
            self._pending_torn = lines.pop()
        chain = walk_chain(lines)
        if chain.findings:
            raise LedgerError(f"{self.path}: cannot continue a broken ledger: {chain.findings[0]}")
        genesis = chain.records[0][1] if chain.records else {}
        if genesis.get("public_key") != self.public_key:
            raise LedgerError(
                f"{self.path}: the key at {self.key_path} is not the key named in the genesis record"
            )
        self.head, self.seq = chain.head, len(chain.records)
        self.resumed = True
        self.recorded = {str(r.get("path")) for _, r in chain.records if r.get("kind") == "checkpoint"}
        self._init_scheme = (genesis.get("init") or {}).get("scheme", LEGACY_SCHEME)
        self._unsigned_checkpoint = bool(chain.records) and chain.records[-1][1].get("kind") == "checkpoint"
        self.last_signed_seq = max(
            (r["seq"] for _, r in chain.records if r.get("kind") == "signature"), default=-1
        )

    def _record_torn_tail(self) -> None:
        torn = self._pending_torn
        if torn is None:
            return
        if not torn.terminated:
            self._write_raw(b"\n")  # end the torn line so the next record starts on its own line
        log.warning(
            "%s: line %d is a torn record (%d bytes); recorded, not removed",
            self.path,
            torn.lineno,
            len(torn.raw),
        )
        self.event(
            "torn_tail", torn_line=torn.lineno, torn_bytes=len(torn.raw), torn_sha256=sha256_bytes(torn.raw)
        )

    # -- the hook API

    def genesis(
        self,
        *,
        config: dict[str, Any],
        seed: int,
        init_state: Mapping[str, Any],
        data_manifest_root: str | None = None,
        tokenizer_hash: str | None = None,
        world_size: int = 1,
        hostnames: Sequence[str] | None = None,
        code_root: str | Path | None = None,
        trainer: str = "kmoe",
        digest_scheme: str = TENSOR_SCHEME,
    ) -> dict[str, Any]:
        """The first record: config, code, environment, data, seed and the initial weight digests.

        `init_state` is the state dict right after `init_weights` (fp32), or a mapping of its tensor digests
        under `digest_scheme`; `trainer` names the program that trains (replay picks its engine by this name).
        """
        if self.seq != 0:
            raise LedgerError(
                f"{self.path}: genesis must be the first record (ledger already has {self.seq})"
            )
        first = next(iter(init_state.values()), None)
        digests = dict(init_state) if isinstance(first, str) else state_digests(init_state, digest_scheme)
        return self._append(
            "genesis",
            format=FORMAT,
            public_key=self.public_key,
            key_id=self.key_id,
            config=jsonable(config),
            config_hash=sha256_json(jsonable(config)),
            seed=int(seed),
            trainer=trainer,
            code=ledger_facts.code_identity(code_root),
            environment=ledger_facts.environment(world_size, hostnames),
            data={"manifest_root": data_manifest_root, "tokenizer_hash": tokenizer_hash},
            init={"tensors": digests, "merkle_root": named_merkle_root(digests), "scheme": digest_scheme},
        )

    def step(
        self,
        step: int,
        *,
        tokens: int,
        loss: float,
        grad_norm: float,
        lr: float,
        lang_tokens: Mapping[str, int] | None = None,
        sample_indices: Sequence[int] | None = None,
        batch_hash: str | None = None,
        expert_load: Any = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """One optimizer step: cumulative tokens, loss, grad norm, lr, batch identity, expert load [L, E]."""
        fields: dict[str, Any] = {
            "step": int(step),
            "tokens": int(tokens),
            "loss": loss,
            "grad_norm": grad_norm,
        }
        fields["lr"] = lr
        if lang_tokens is not None:
            fields["lang_tokens"] = {k: int(v) for k, v in lang_tokens.items()}
        if sample_indices is not None:
            fields["samples"] = compact_indices(sample_indices)
        if batch_hash is not None:
            fields["batch_hash"] = batch_hash
        if expert_load is not None:
            fields["expert_load"] = expert_load_stats(expert_load)
        return self._append("step", **fields, **extra)

    def checkpoint(
        self,
        step: int,
        path: str | Path,
        *,
        tokens: int,
        roots: dict[str, str],
        files: Mapping[str, str] | None = None,
        digest_scheme: str = TENSOR_SCHEME,
    ) -> dict[str, Any]:
        """A checkpoint written at `step`, then a signature over the chain head.

        `roots` holds the Merkle roots the trainer computed from memory (model, optimizer, rng, data) over
        per-tensor digests of `digest_scheme`; `files` the sha256 of every file in the directory, as the
        writer hashed them while writing (computed here only when not given).
        """
        path = Path(path)
        if not path.is_dir():
            raise LedgerError(f"{path}: checkpoint directory does not exist")
        self.recorded.add(self.relpath(path))
        rec = self._append(
            "checkpoint",
            step=int(step),
            tokens=int(tokens),
            path=self.relpath(path),
            roots=dict(roots),
            digest_scheme=digest_scheme,
            files=dict(files) if files is not None else dir_file_digests(path),
        )
        self._sign(final=False)
        return rec

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Anything else an auditor must see. Kinds with checked meaning: resume, rollback, skip_step,
        weights_load, config_override, signal, checkpoint_deleted, torn_tail, end (see docs/ledger.md)."""
        if not kind or not isinstance(kind, str):
            raise LedgerError("event kind must be a non-empty string")
        return self._append("event", event=kind, **fields)

    def weights_load(self, path: str | Path, model_root: str, purpose: str) -> dict[str, Any]:
        """Record a load of weights from a file (resume or otherwise) with the Merkle root of what was loaded."""
        return self.event(
            "weights_load", path=self.relpath(Path(path)), model_root=model_root, purpose=purpose
        )

    def identity(self) -> dict[str, Any]:
        """What ties other records (wandb summary, model card) to this ledger: the hash of its last record
        (`kmoe audit verify` prints it as `head`), the signing key's id and public key, the record count."""
        return {"ledger_head": self.head, "ledger_key_id": self.key_id, "ledger_public_key": self.public_key,
                "ledger_records": self.seq}  # fmt: skip

    def has_genesis(self) -> bool:
        return self.seq > 0

    def init_scheme(self) -> str:
        """The tensor digest scheme of the genesis init digests (ledgers before it was recorded: legacy)."""
        return self._init_scheme

    def recorded_checkpoints(self) -> set[str] | None:
        """Paths of the checkpoints this ledger records (relative to the run dir when inside it)."""
        return set(self.recorded)

    def resume(self, path: str | Path, step: int, model_root: str, kind: str = "resume") -> None:
        """A resume (or `kind="rollback"`) from checkpoint `path` at `step`, and the weight load it implies."""
        if kind not in ("resume", "rollback"):
            raise LedgerError(f"resume kind must be 'resume' or 'rollback', got {kind!r}")
        self.event(kind, checkpoint=self.relpath(Path(path)), step=int(step), model_root=model_root)
        self.weights_load(path, model_root, purpose=kind)

    def close(self, status: str = "completed") -> None:
        """An `end` event and a final signature; the file is closed."""
        if self._f is None:
            return
        self.event("end", status=status)
        self._sign(final=True)
        self._f.close()
        self._f = None

    # -- internals

    def relpath(self, path: Path) -> str:
        run_dir = self.path.parent.resolve()
        p = path.resolve()
        return p.relative_to(run_dir).as_posix() if p.is_relative_to(run_dir) else str(p)

    def sign(self) -> dict[str, Any]:
        """A signature over the current head (checkpoints and close sign by themselves); signing every few
        hundred steps shortens the unsigned tail a crash leaves, which `verify` must report."""
        return self._sign(final=False)

    def _sign(self, final: bool) -> dict[str, Any]:
        sig = self.key.sign(SIG_DOMAIN + self.head.encode()).hex()
        rec = self._append("signature", key_id=self.key_id, signed_seq=self.seq - 1, sig=sig, final=final)
        if self._f is not None and not self.fsync:
            os.fsync(self._f.fileno())  # signed records always reach the disk, even with fsync off
        return rec

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        if self._f is None:
            raise LedgerError(f"{self.path}: ledger is closed")
        rec = {"seq": self.seq, "prev": self.head, "kind": kind, "time": _now(), **jsonable(fields)}
        data = canonical_json(rec)  # raises on NaN, which jsonable already turned into strings
        self._write_raw(data + b"\n")
        self.head, self.seq = sha256_bytes(data), self.seq + 1
        return rec

    def _write_raw(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

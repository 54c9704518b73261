"""`kmoe audit verify RUN_DIR`: the ledger's chain, signatures, checkpoints on disk and continuity.

Every failed check is a finding that names the record (seq and line) it concerns; the run passes only with
no findings. Notes are facts an auditor should read but that do not fail the run (a recorded torn write,
a run that has not closed, a public key that was not pinned by an independent source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmoe.hashing import named_merkle_root, sha256_file, sha256_json
from training.audit.shard_check import check_sharded
from training.ledger import default_key_path
from training.ledger_chain import (
    FORMAT,
    LEDGER_FILE,
    Chain,
    key_id,
    read_lines,
    verify_signature,
    walk_chain,
)


@dataclass
class Verification:
    run_dir: Path
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    chain: Chain | None = None

    @property
    def ok(self) -> bool:
        return not self.findings


def _where(rec: dict[str, Any], line: Any) -> str:
    return f"seq {rec.get('seq')} (line {line.lineno}, {rec.get('kind')}{_ev(rec)})"


def _ev(rec: dict[str, Any]) -> str:
    return f" {rec['event']}" if rec.get("kind") == "event" else ""


def resolve_pubkey(pin: str | None, run_dir: Path) -> tuple[str | None, str]:
    """The pinned key (hex public key or its key id) and where it came from; None when nothing pins it."""
    if pin:
        p = Path(pin)
        value = p.read_text().strip() if p.is_file() else pin.strip()
        return value.lower(), f"--pubkey {pin}"
    pub = Path(str(default_key_path(run_dir)) + ".pub")
    if pub.is_file():
        return pub.read_text().strip().lower(), str(pub)
    return None, ""


def check_genesis(v: Verification, pin: str | None) -> dict[str, Any] | None:
    recs = v.chain.records if v.chain else []
    if not recs or recs[0][1].get("kind") != "genesis":
        v.findings.append("seq 0: no genesis record")
        return None
    line, g = recs[0]
    where = _where(g, line)
    if g.get("format") != FORMAT:
        v.findings.append(f"{where}: format {g.get('format')!r}, expected {FORMAT!r}")
    pk = str(g.get("public_key", ""))
    if key_id(pk) != g.get("key_id") if pk else True:
        v.findings.append(f"{where}: key_id does not match the public key it names")
    if g.get("config_hash") != sha256_json(g.get("config")):
        v.findings.append(f"{where}: config_hash does not match the recorded config")
    init = g.get("init") or {}
    if named_merkle_root(init.get("tensors") or {}) != init.get("merkle_root"):
        v.findings.append(f"{where}: init merkle_root does not match the per-tensor init digests")
    pinned, source = resolve_pubkey(pin, v.run_dir)
    if pinned is None:
        v.notes.append(
            "public key not pinned: pass --pubkey <key id or hex key> taken from an independent record "
            "(wandb summary, model card) to rule out a ledger rewritten under a new key"
        )
    elif pinned not in (pk, key_id(pk) if pk else ""):
        v.findings.append(
            f"{where}: genesis public key (key id {g.get('key_id', '?')[:16]}...) is not the pinned key "
            f"from {source}: the ledger was re-signed with a different key"
        )
    else:
        v.notes.append(f"public key matches the pinned key from {source}")
    return g


def check_signatures(v: Verification, genesis: dict[str, Any]) -> None:
    recs = v.chain.records if v.chain else []
    pk = str(genesis.get("public_key", ""))
    last_signed = -1
    for i, (line, rec) in enumerate(recs):
        kind = rec.get("kind")
        if kind == "checkpoint":
            # a torn_tail event may sit between: the crash tore the signature, the reopened ledger signs
            nxt = next(
                (recs[j][1] for j in range(i + 1, len(recs)) if recs[j][1].get("event") != "torn_tail"), {}
            )
            if nxt.get("kind") != "signature":
                v.findings.append(f"{_where(rec, line)}: checkpoint record is not followed by a signature")
        if kind != "signature":
            continue
        if rec.get("signed_seq") != rec.get("seq", 0) - 1 or rec.get("key_id") != genesis.get("key_id"):
            v.findings.append(f"{_where(rec, line)}: signature names the wrong record or key")
        if not verify_signature(pk, str(rec.get("prev", "")), str(rec.get("sig", ""))):
            v.findings.append(
                f"{_where(rec, line)}: Ed25519 signature over the chain head does not verify with the "
                "genesis public key (forged or re-signed record)"
            )
        last_signed = rec.get("seq", -1)
    if recs and recs[-1][1].get("kind") != "signature":
        first, last = last_signed + 1, recs[-1][1].get("seq")
        v.findings.append(
            f"seq {first}..{last}: {last - first + 1} record(s) after the last signature are not covered by "
            "any signature (appended without the run's key, or the run stopped without signing)"
        )
    elif recs and not recs[-1][1].get("final"):
        v.notes.append("the run has not closed: the last signature is a checkpoint signature, not final")


def check_checkpoints(v: Verification) -> None:
    recs = v.chain.records if v.chain else []
    deleted = {
        r.get("path") for _, r in recs if r.get("kind") == "event" and r.get("event") == "checkpoint_deleted"
    }
    _unrecorded_checkpoints(v, recs)
    for line, rec in recs:
        if rec.get("kind") != "checkpoint":
            continue
        where = f"{_where(rec, line)} step {rec.get('step')}"
        rel = str(rec.get("path"))
        path = Path(rel) if Path(rel).is_absolute() else v.run_dir / rel
        if not path.is_dir():
            if rel in deleted:
                v.notes.append(f"{where}: {rel} was deleted, as recorded; its digests cannot be rechecked")
            else:
                v.findings.append(
                    f"{where}: checkpoint directory {rel} is missing and no deletion is recorded"
                )
            continue
        files = rec.get("files") or {}
        hashed = _sharded(v, where, path, rel, rec)  # shard files: hashed in the same pass as their digests
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        for name in sorted(set(files) | on_disk):
            if name not in files:
                v.findings.append(f"{where}: {rel}/{name} is on disk but not recorded")
            elif name not in on_disk:
                v.findings.append(f"{where}: {rel}/{name} is recorded but missing")
            elif hashed.get(name, "") != files[name] and (
                name in hashed or sha256_file(path / name) != files[name]
            ):
                v.findings.append(f"{where}: {rel}/{name} does not match its recorded sha256")
        digests = path / "digests.json"
        if digests.is_file():
            root = json.loads(digests.read_text()).get("merkle_root")
            if root != (rec.get("roots") or {}).get("model"):
                v.findings.append(f"{where}: digests.json merkle root is not the recorded model root")


def _sharded(v: Verification, where: str, path: Path, rel: str, rec: dict[str, Any]) -> dict[str, str]:
    """A format-2 (sharded) checkpoint: every tensor's digest recomputed from the shard files as stored."""
    mf = path / "checkpoint.json"
    try:
        manifest = json.loads(mf.read_text()) if mf.is_file() else {}
    except ValueError:
        return {}
    if manifest.get("format") != "kmoe-train-checkpoint/2":
        return {}
    findings, hashed = check_sharded(
        path, rel, manifest, rec.get("files") or {}, (rec.get("roots") or {}).get("model")
    )
    v.findings += [f"{where}: {f}" for f in findings]
    return hashed


def _unrecorded_checkpoints(v: Verification, recs: list) -> None:
    """A checkpoint directory the ledger never names: records cut off at the end, or weights dropped in."""
    base = v.run_dir / "checkpoints"
    if not base.is_dir():
        return
    named = {(v.run_dir / str(r.get("path"))).resolve() for _, r in recs if r.get("kind") == "checkpoint"}
    last = recs[-1][1].get("seq") if recs else None
    # dot-directories are a trainer's atomic-write staging area, not checkpoints
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.resolve() not in named:
            v.findings.append(
                f"checkpoints/{d.name}: on disk but no checkpoint record names it (the ledger ends at seq {last}; "
                "records after it may have been cut off)"
            )


def check_continuity(v: Verification, genesis: dict[str, Any]) -> None:
    """Steps contiguous (across resumes), resumes point at recorded checkpoints, tokens monotone."""
    recs = v.chain.records if v.chain else []
    known_roots = {(genesis.get("init") or {}).get("merkle_root")}
    ckpts: dict[str, dict[str, Any]] = {}
    last_step, last_tokens = 0, 0
    tokens_at: dict[int, int] = {0: 0}  # tokens after each step of the current trajectory
    torn_seqs = {ev.get("seq") for _, ev in (v.chain.torn if v.chain else [])}
    for line, rec in recs:
        kind, where = rec.get("kind"), _where(rec, line)
        ev = rec.get("event")
        if kind == "step" or (kind == "event" and ev == "skip_step"):
            step = rec.get("step")
            if step != last_step + 1:
                v.findings.append(f"{where}: step {step} follows step {last_step} (expected {last_step + 1})")
            if kind == "step":
                tokens = rec.get("tokens", -1)
                if not isinstance(tokens, int) or tokens <= last_tokens:
                    v.findings.append(f"{where}: tokens {tokens} not above the previous count {last_tokens}")
                else:
                    last_tokens = tokens
            last_step = step if isinstance(step, int) else last_step
            tokens_at[last_step] = last_tokens
        elif kind == "checkpoint":
            lagging = (
                rec.get("written_async") and isinstance(rec.get("step"), int) and rec["step"] < last_step
            )
            if lagging and rec.get("tokens") != tokens_at.get(rec["step"]):
                v.findings.append(
                    f"{where}: async checkpoint at step {rec.get('step')} / tokens {rec.get('tokens')} but step "
                    f"{rec.get('step')} recorded {tokens_at.get(rec['step'])} tokens"
                )
            elif not lagging and (rec.get("step") != last_step or rec.get("tokens") != last_tokens):
                v.findings.append(
                    f"{where}: checkpoint at step {rec.get('step')} / tokens {rec.get('tokens')} but the last "
                    f"step recorded is {last_step} / {last_tokens}"
                )
            ckpts[str(rec.get("path"))] = rec
            known_roots.add((rec.get("roots") or {}).get("model"))
        elif kind == "event" and ev in ("resume", "rollback"):
            ck = ckpts.get(str(rec.get("checkpoint")))
            if ck is None:
                v.findings.append(
                    f"{where}: {ev} from {rec.get('checkpoint')}, which is not a recorded checkpoint"
                )
                continue
            if rec.get("model_root") != (ck.get("roots") or {}).get("model") or rec.get("step") != ck.get(
                "step"
            ):
                v.findings.append(
                    f"{where}: {ev} root/step differ from the checkpoint record seq {ck.get('seq')}"
                )
            last_step, last_tokens = ck.get("step", 0), ck.get("tokens", 0)
            tokens_at[last_step] = last_tokens
        elif kind == "event" and ev == "restart":
            if rec.get("model_root") != (genesis.get("init") or {}).get("merkle_root"):
                v.findings.append(f"{where}: restart from weights that are not the genesis initial weights")
            last_step, last_tokens = 0, 0
        elif kind == "event" and ev == "weights_load" and rec.get("model_root") not in known_roots:
            v.findings.append(
                f"{where}: weights loaded from {rec.get('path')} (root {str(rec.get('model_root'))[:16]}...) "
                "are not the initial weights or a checkpoint of this run"
            )
        elif kind == "event" and ev == "torn_tail" and rec.get("seq") not in torn_seqs:
            v.findings.append(f"{where}: records a torn line {rec.get('torn_line')} that is not in the file")
        elif kind == "event" and ev in (
            "torn_tail",
            "config_override",
            "signal",
            "checkpoint_unrecorded",
            "restart",
        ):
            v.notes.append(f"{where}: {json.dumps({k: rec[k] for k in sorted(rec) if k not in ('prev',)})}")
    v.summary.update(last_step=last_step, tokens=last_tokens)


def verify_run(run_dir: str | Path, pubkey: str | None = None, check_files: bool = True) -> Verification:
    """Run every check on RUN_DIR; see Verification.ok / .findings."""
    v = Verification(Path(run_dir))
    path = v.run_dir / LEDGER_FILE
    if not path.is_file():
        v.findings.append(f"{path}: no ledger")
        return v
    v.chain = walk_chain(read_lines(path))
    v.findings += v.chain.findings
    for torn, ev in v.chain.torn:
        v.notes.append(
            f"line {torn.lineno}: torn write of {len(torn.raw)} bytes, recorded by seq {ev.get('seq')}"
        )
    genesis = check_genesis(v, pubkey)
    if genesis is not None:
        check_signatures(v, genesis)
        check_continuity(v, genesis)
    if check_files:
        check_checkpoints(v)
    recs = [r for _, r in v.chain.records]
    v.summary.update(
        records=len(recs),
        steps=sum(r.get("kind") == "step" for r in recs),
        checkpoints=sum(r.get("kind") == "checkpoint" for r in recs),
        signatures=sum(r.get("kind") == "signature" for r in recs),
        key_id=(genesis or {}).get("key_id"),
        head=v.chain.head,
    )
    return v

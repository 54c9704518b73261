"""The tokenizer a checkpoint was trained with: found from its run and checked against the run's ledger.

A training checkpoint lives in a run directory (`RUN/checkpoints/step-N/`) whose `ledger.jsonl` starts with a
genesis record holding `data.tokenizer_hash`, the identity of the tokenizer the shards were encoded with. The
checkpoint's `config.yaml` (the resolved run config) says where that tokenizer is: `data.tokenizer`, else the
one the shard manifest names (`<data.shards>/manifest.json` `tokenizer.path`, normally `<data.shards>/tokenizer`).
A tokenizer is used only when its identity equals the ledger's: the identity is what training recorded,
`kmoe_tokenizer.json`'s `digest` (data_prep.tokenizer.tokenizer_digest over the model files, recomputed here
from the files) or, for a tokenizer dir without a digest, the sha256 of kmoe_tokenizer.json itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kmoe import configtree
from kmoe.hashing import sha256_file

LEDGER = "ledger.jsonl"
META = "kmoe_tokenizer.json"


class TokenizerUnknown(ValueError):
    """No tokenizer can be vouched for: the run is unknown, records none, or its tokenizer is gone or changed."""


@dataclass
class RunTokenizer:
    path: Path | None  # the tokenizer dir to ship; None: export without one (--no-tokenizer)
    digest: str | None  # its identity (the ledger's tokenizer_hash when checked)
    how: str  # "run" (found from the run), "given" (--tokenizer), "none" (--no-tokenizer)
    ledger: Path | None  # the ledger it was checked against, if any


def find_ledger(path: str | Path, levels: int = 3) -> Path | None:
    """RUN/ledger.jsonl for a path inside a run dir (looked up to `levels` parents: RUN/checkpoints/step-N)."""
    p = Path(path).resolve()
    for d in [p, *list(p.parents)[:levels]]:
        if (d / LEDGER).is_file():
            return d / LEDGER
    return None


def recorded_tokenizer(ledger: Path) -> str | None:
    """`data.tokenizer_hash` of the ledger's genesis record (its first line)."""
    with ledger.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        genesis = json.loads(first)
    except json.JSONDecodeError:
        raise ValueError(f"{ledger}:1: not a JSON record (a kmoe ledger starts with its genesis)") from None
    if genesis.get("kind") != "genesis":
        raise ValueError(f"{ledger}:1: kind {genesis.get('kind')!r}, expected the genesis record")
    return (genesis.get("data") or {}).get("tokenizer_hash")


def identities(tok_dir: Path) -> set[str]:
    """The identity training would have recorded for this tokenizer dir (see the module docstring), recomputed
    from the files where the dir has them."""
    from data_prep.tokenizer import DIGEST_FILES, tokenizer_digest

    meta = tok_dir / META
    if not meta.is_file():
        return set()  # training refuses such a dir: it reads the EOD id from kmoe_tokenizer.json
    declared = json.loads(meta.read_text()).get("digest")
    if not declared:
        return {sha256_file(meta)}
    if all((tok_dir / n).is_file() for n in DIGEST_FILES):
        return {tokenizer_digest(tok_dir)}
    return {declared}  # no model files to recompute from (toy byte-level shards): the declared digest it is


def candidate_dirs(checkpoint: Path) -> list[Path]:
    """Where the run config of `checkpoint` says its tokenizer is (paths as training resolved them: from the
    working directory)."""
    cfg_file = checkpoint / "config.yaml"
    if not cfg_file.is_file():
        return []
    data = configtree.read_yaml(cfg_file).get("data") or {}
    if data.get("tokenizer"):
        return [Path(data["tokenizer"])]
    if not data.get("shards"):
        return []
    shards = Path(data["shards"])
    found = []
    manifest = shards / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("tokenizer")
        rel = entry.get("path") if isinstance(entry, dict) else None  # some manifests record only a digest
        if rel:
            found.append(shards / rel)
    return [*found, shards / "tokenizer"]


EXPORT_HINT = (
    "pass --tokenizer DIR, or --no-tokenizer to export the weights alone (then no AutoTokenizer loads it)"
)


def checkpoint_tokenizer(
    checkpoint: str | Path, given: str | Path | None = None, hint: str = EXPORT_HINT
) -> RunTokenizer:
    """The tokenizer to ship with `checkpoint`: `given` (checked against the run's ledger when there is one) or
    the run's own; TokenizerUnknown (ending with `hint`) when neither can be vouched for."""
    ckpt = Path(checkpoint)
    ledger = find_ledger(ckpt)
    recorded = recorded_tokenizer(ledger) if ledger else None
    if given is not None:
        tok = Path(given)
        if recorded and recorded not in identities(tok):
            raise ValueError(
                f"--tokenizer {tok} is not the tokenizer this checkpoint was trained with: the run's ledger "
                f"{ledger} records tokenizer {recorded[:16]}..., this one is {_show(identities(tok))}"
            )
        return RunTokenizer(tok, recorded, "given", ledger if recorded else None)
    if ledger is None:
        raise TokenizerUnknown(f"{ckpt}: not inside a training run (no {LEDGER} above it), so its tokenizer is unknown; {hint}")  # fmt: skip
    if not recorded:
        raise TokenizerUnknown(
            f"{ledger}: the genesis record names no tokenizer (data.tokenizer_hash); {hint}"
        )
    tried = []
    for d in candidate_dirs(ckpt):
        if not d.is_dir():
            tried.append(f"{d} (missing)")
            continue
        got = identities(d)
        if recorded in got:
            return RunTokenizer(d, recorded, "run", ledger)
        tried.append(f"{d} (tokenizer {_show(got)}: changed since training)")
    raise TokenizerUnknown(
        f"{ckpt}: the run's ledger records tokenizer {recorded[:16]}... but no tokenizer dir with that identity "
        f"was found ({'; '.join(tried) or 'the checkpoint config names no data.tokenizer or data.shards'}); {hint}"
    )


def _show(ids: set[str]) -> str:
    return ", ".join(sorted(i[:16] + "..." for i in ids)) or "of unknown identity (no kmoe_tokenizer.json)"

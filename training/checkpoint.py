"""Training checkpoints: sharded (every rank writes and reads only its own shards), atomic, digest-verified.

`checkpoints/step-XXXXXXXX/` (format kmoe-train-checkpoint/2):
  model/shard-<rank>.safetensors      this rank's blocks of the weights (training/dcp_storage.py)
  optimizer/shard-<rank>.safetensors  its blocks of the AdamW moments (`<param>/exp_avg`, ...) and steps
  config.yaml, digests.json           the kmoe model checkpoint beside them (model/checkpoint.py): resolved
                                      config, per-tensor layout-independent digests and their Merkle root
  optimizer.json                      the optimizer's param groups
  rng.safetensors                     torch CPU (and CUDA) RNG state of every rank (`rank<r>.cpu`)
  trainer_state.json                  step, data position, spike window, python/numpy RNG of every rank
  checkpoint.json                     written last: sha256 and size of every file (shard files hashed once,
                                      by the rank that wrote them, while writing), the chunk map, dtype,
                                      shape and digest of every tensor, the roots the ledger records
torch.distributed.checkpoint plans the writes and, on load, reads what each rank's layout needs, whatever
layout saved it (world size, FSDP, expert parallelism). A directory is complete only once renamed from
`.tmp-step-*` with checkpoint.json inside; `--resume auto` ignores anything else. Loading checks the
files named in the manifest (present, recorded size), reads with safetensors and JSON only (no pickle),
then checks every loaded tensor's digest, computed where it was loaded. Format-1 checkpoints (one full
model.safetensors) still load (training/checkpoint_legacy.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_file, save_file

from kmoe.hashing import TENSOR_SCHEME, named_merkle_root, sha256_file, sha256_json, state_digests
from model.checkpoint import CheckpointError

from . import checkpoint_legacy
from .dcp_storage import ShardReader, ShardWriter
from .digests import sharded_digests

log = logging.getLogger(__name__)
# One process without a process group is a layout like any other here, not news (DCP warns on every call,
# from the writer thread too when the save is async).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

FORMAT = "kmoe-train-checkpoint/2"
MANIFEST = "checkpoint.json"
STEP_RE = re.compile(r"^step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


# ---------------------------------------------------------------- state <-> flat DCP keys


def flatten_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An engine state ({"model": {name: t}, "optimizer": {"state": {name: {slot: t}}, ...}}) as DCP keys
    `model/<name>` and `optimizer/<name>/<slot>`; tensors stay as they are (DTensor shards stay shards)."""
    flat = {f"model/{k}": v for k, v in state["model"].items()}
    for name, slots in state["optimizer"]["state"].items():
        for slot, v in slots.items():
            flat[f"optimizer/{name}/{slot}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat


def unflatten_state(flat: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    model, opt = {}, {}
    for key, t in flat.items():
        part, rest = key.split("/", 1)
        if part == "model":
            model[rest] = t
        else:
            name, slot = rest.rsplit("/", 1)
            opt.setdefault(name, {})[slot] = t
    return {"model": model, "optimizer": {"state": opt, "param_groups": groups}}


# ---------------------------------------------------------------- RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's RNG states: tensors (torch CPU/CUDA) and JSON (python, numpy)."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    host = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *[float(x) if isinstance(x, float) else int(x) for x in np_state[2:]],
        ],
    }
    return tensors, host


def restore_rng(tensors: dict[str, torch.Tensor], host: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    py = host["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = host["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def rank_rng(flat: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One rank's RNG tensors (rank 0's when the checkpoint had fewer ranks)."""
    key = f"rank{rank}" if f"rank{rank}.cpu" in flat else "rank0"
    return {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(key + ".")}


def data_position(trainer: dict[str, Any]) -> dict[str, Any]:
    """The part of the trainer state that says where in the data the run is (its hash goes to the ledger)."""
    return {k: trainer[k] for k in ("step", "tokens", "batch_cursor", "skipped_batches") if k in trainer}


# ---------------------------------------------------------------- saving


@dataclass
class HostState:
    """What rank 0 writes beside the shards (small: no tensor of the model)."""

    config: dict[str, Any]
    trainer_state: dict[str, Any]
    rng: dict[str, dict[str, torch.Tensor]]  # rank<r> -> {"cpu": ..., "cuda": ...}
    param_groups: list[dict[str, Any]]


@dataclass
class PendingSave:
    """A checkpoint whose shards are being written (async) or written; `finish_save` completes it."""

    root: Path
    step: int
    tmp: Path
    writer: ShardWriter
    future: Any  # torch Future of an async save; None once the shards are on disk
    host: HostState | None  # rank 0 only
    asynchronous: bool

    def done(self) -> bool:
        return self.future is None or self.future.done()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp_args() -> dict[str, Any]:
    return {"no_dist": not _distributed()}


def begin_save(root: Path, step: int, flat: dict[str, torch.Tensor], host: HostState | None,
               group: Any = None, asynchronous: bool = False) -> PendingSave:  # fmt: skip
    """Every rank: write its shards of `flat` into `root/.tmp-step-N/` (in a background thread when
    `asynchronous`; training may go on, the state was copied). Collective over `group`."""
    tmp = root / f".tmp-{step_dir(root, step).name}"
    if host is not None:  # rank 0 clears what a crashed earlier attempt left
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if _distributed():
        dist.barrier(group=group)
    writer = ShardWriter(tmp)
    kw = _dcp_args()
    future = dcp.async_save(flat, storage_writer=writer, process_group=group, **kw) if asynchronous else None
    if not asynchronous:
        dcp.save(flat, storage_writer=writer, process_group=group, **kw)
    return PendingSave(root, step, tmp, writer, future, host, asynchronous)


def finish_save(p: PendingSave) -> dict[str, Any] | None:
    """Wait for the shards; on rank 0 write the small files and the manifest, rename atomically and return
    {path, roots, files, digest_scheme} for the ledger (None on other ranks). No collective."""
    if p.future is not None:
        p.future.result()
        p.future = None
    if p.host is None:
        return None
    summary = p.writer.summary
    assert summary is not None, "the coordinator's writer summarises the save"
    tmp, host = p.tmp, p.host
    (tmp / "config.yaml").write_text(yaml.safe_dump(host.config, sort_keys=False, allow_unicode=True))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": host.param_groups}, indent=1))
    rng_flat = {f"{rank}.{k}": v for rank, ts in host.rng.items() for k, v in ts.items()}
    save_file(rng_flat, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(host.trainer_state, indent=1, sort_keys=True))
    model = {n: t["digest"] for n, t in summary["tensors"].get("model", {}).items()}
    digests = {"tensors": model, "merkle_root": named_merkle_root(model), "scheme": TENSOR_SCHEME}
    (tmp / "digests.json").write_text(json.dumps(digests, indent=1, sort_keys=True))
    files = {rel: f["sha256"] for rel, f in summary["files"].items()}
    files.update({n: sha256_file(tmp / n) for n in ("config.yaml", "optimizer.json", "rng.safetensors",
                                                    "trainer_state.json", "digests.json")})  # fmt: skip
    optimizer = {n: t["digest"] for n, t in summary["tensors"].get("optimizer", {}).items()}
    roots = {
        "model": digests["merkle_root"],
        "optimizer": named_merkle_root(optimizer),
        "rng": named_merkle_root(state_digests(rng_flat, TENSOR_SCHEME)),
        "data": sha256_json(data_position(host.trainer_state["trainer"])),
    }
    manifest = {"format": FORMAT, "step": p.step, "digest_scheme": TENSOR_SCHEME, "roots": roots,
                "world_size": host.trainer_state.get("world_size"), "files": dict(sorted(files.items())),
                "sizes": {rel: f["bytes"] for rel, f in summary["files"].items()}, "shards": summary["shards"],
                "tensors": summary["tensors"]}  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    files[MANIFEST] = sha256_file(tmp / MANIFEST)
    final = _publish(p.root, tmp, p.step)
    return {"path": final, "roots": roots, "files": files, "digest_scheme": TENSOR_SCHEME,
            "written_async": p.asynchronous}  # fmt: skip


def _publish(root: Path, tmp: Path, step: int) -> Path:
    """fsync the small files and every directory, then rename into place (shard files were fsynced by
    the ranks that wrote them)."""
    for f in sorted(tmp.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)
    final = step_dir(root, step)
    if final.exists():  # rewritten after a rollback: replace, never leave two
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints outside the last `keep_last` and not a multiple of `keep_every`."""
    found = complete_checkpoints(root)
    keep = {s for s, _ in found[-keep_last:]}
    removed = []
    for s, d in found:
        if s in keep or (keep_every > 0 and s % keep_every == 0):
            continue
        shutil.rmtree(d)
        removed.append(d)
    return removed


def remove_partial(root: Path) -> None:
    """Left-overs of a crash while writing (never valid checkpoints)."""
    if root.is_dir():
        for d in root.glob(".tmp-step-*"):
            shutil.rmtree(d, ignore_errors=True)
        for d in root.glob(".trash-step-*"):
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- loading


def read_manifest(path: Path) -> dict[str, Any]:
    """checkpoint.json of a complete checkpoint (either format); errors name the file."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MANIFEST} missing)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") not in (FORMAT, checkpoint_legacy.FORMAT):
        raise CheckpointError(f"{mf}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def check_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every shard file the manifest names is there with its recorded size (a cheap check before reading;
    the content is checked by the digests of what is loaded)."""
    for rel, size in sorted(manifest["sizes"].items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: shard file {rel} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{path}: shard file {rel} has {f.stat().st_size} bytes, recorded {size} (truncated?)"
            )


def load_into(path: Path, manifest: dict[str, Any], flat: dict[str, torch.Tensor], group: Any = None) -> str:
    """Every rank: fill `flat` (its own layout's tensors, DCP keys) from the checkpoint's shards, then check
    each tensor's digest, computed by the ranks that hold it. Returns the Merkle root of the model digests
    measured on the loaded tensors (what the ledger records for the load). Collective."""
    check_files(path, manifest)
    dcp.load(flat, storage_reader=ShardReader(path, manifest), process_group=group, **_dcp_args())
    got = sharded_digests(flat, group)
    for key in sorted(flat):
        part, name = key.split("/", 1)
        want = manifest["tensors"][part][name]["digest"]
        if got[key] != want:
            raise CheckpointError(
                f"{path}: tensor '{name}' ({part}) does not match its recorded digest after loading "
                "(corrupt or modified shard file; refusing to resume from it)"
            )
    return named_merkle_root({k.split("/", 1)[1]: d for k, d in got.items() if k.startswith("model/")})


def load_host(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The small files (JSON and the RNG file), read by every rank."""
    rng_file = path / "rng.safetensors"
    if sha256_file(rng_file) != manifest["files"]["rng.safetensors"]:
        raise CheckpointError(f"{path}: file rng.safetensors does not match its recorded sha256")
    out = {"rng": load_file(str(rng_file)), "merkle_root": manifest["roots"]["model"], "step": int(manifest["step"]),
           "digest_scheme": manifest["digest_scheme"]}  # fmt: skip
    for name in ("trainer_state.json", "optimizer.json"):
        raw = (path / name).read_bytes()
        if sha256_file(path / name) != manifest["files"][name]:
            raise CheckpointError(f"{path}: file {name} does not match its recorded sha256")
        out[name] = json.loads(raw)
    out["trainer_state"] = out.pop("trainer_state.json")
    out["param_groups"] = out.pop("optimizer.json")["param_groups"]
    return out


def load_legacy(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    return checkpoint_legacy.load(path, manifest)

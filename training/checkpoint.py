"""Training checkpoints: atomic, digest-verified, full (unsharded) state that resumes on any world size.

`checkpoints/step-XXXXXXXX/` holds a kmoe model checkpoint (model.safetensors, config.yaml, digests.json;
see model/checkpoint.py) plus
  optimizer.safetensors   AdamW moments and step per parameter, as `<param name>/<key>`
  optimizer.json          the optimizer's param groups (hyper-parameters, parameter names)
  rng.safetensors         torch CPU (and CUDA) RNG state of every rank, as `rank<r>.cpu` / `rank<r>.cuda`
  trainer_state.json      step, data position (batch cursor, skipped batches), spike window, python/numpy RNG
  checkpoint.json         written last: sha256 of every file above and per-tensor digests of every tensor file
A directory is complete only once renamed from `.tmp-step-*` with checkpoint.json inside; `--resume auto`
ignores anything else. Loading uses safetensors and JSON only (no pickle).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kmoe.hashing import (
    LEGACY_SCHEME,
    TENSOR_SCHEME,
    named_merkle_root,
    sha256_file,
    sha256_json,
    state_digests,
)
from model.checkpoint import CheckpointError, save_model_dir

log = logging.getLogger(__name__)

FORMAT = "kmoe-train-checkpoint/1"
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


def flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, slots in opt_state["state"].items():
        for key, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{name}/{key}"] = t.detach().to("cpu").contiguous()
    return tensors, opt_state["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, t in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = t
    return {"state": state, "param_groups": groups}


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


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def save(root: Path, step: int, state: dict[str, Any], config: dict[str, Any], trainer_state: dict[str, Any],
         rng: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:  # fmt: skip
    """Write one checkpoint atomically (rank 0 only); returns {path, digests, merkle_root}."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    record = save_model_dir(tmp, state["model"], config)
    opt_tensors, groups = flatten_optimizer(state["optimizer"])
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))
    rng_flat = {f"{rank}.{k}": v for rank, ts in rng.items() for k, v in ts.items()}
    save_file(rng_flat, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
        "digest_scheme": TENSOR_SCHEME,
        "tensors": {
            "model.safetensors": record["tensors"],
            "optimizer.safetensors": state_digests(opt_tensors, TENSOR_SCHEME),
            "rng.safetensors": state_digests(rng_flat, TENSOR_SCHEME),
        },
        "model_merkle_root": record["merkle_root"],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_tree(tmp)
    if final.exists():  # rewritten after a rollback: replace, never leave two
        trash = root / f".trash-{final.name}-{os.getpid()}"
        final.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(final)
    _fsync_dir(root)
    roots = {
        "model": record["merkle_root"],
        "optimizer": named_merkle_root(manifest["tensors"]["optimizer.safetensors"]),
        "rng": named_merkle_root(manifest["tensors"]["rng.safetensors"]),
        "data": sha256_json(data_position(trainer_state["trainer"])),
    }
    return {"path": final, "digests": record["tensors"], "merkle_root": record["merkle_root"], "roots": roots,
            "digest_scheme": TENSOR_SCHEME}  # fmt: skip


def data_position(trainer: dict[str, Any]) -> dict[str, Any]:
    """The part of the trainer state that says where in the data the run is (its hash goes to the ledger)."""
    return {k: trainer[k] for k in ("step", "tokens", "batch_cursor", "skipped_batches") if k in trainer}


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


def _check_tensors(path: Path, fname: str, recorded: dict[str, str], scheme: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path / fname))
    except Exception as e:  # a corrupt header: the file cannot even be parsed
        raise CheckpointError(f"{path / fname}: unreadable safetensors file ({e})") from e
    actual = state_digests(tensors, scheme)
    for name in sorted(set(recorded) | set(actual)):
        if recorded.get(name) != actual.get(name):
            raise CheckpointError(
                f"{path}: tensor '{name}' in {fname} does not match its recorded digest ({scheme}) "
                "(corrupt or modified checkpoint; refusing to resume from it)"
            )
    return tensors


def load(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint: every tensor and file against checkpoint.json. Errors name the tensor."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MANIFEST} missing)")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    scheme = manifest.get("digest_scheme", LEGACY_SCHEME)
    tensors = {f: _check_tensors(path, f, manifest["tensors"][f], scheme) for f in manifest["tensors"]}
    model_digests = json.loads((path / "digests.json").read_text())["tensors"]
    if model_digests != manifest["tensors"]["model.safetensors"]:
        raise CheckpointError(f"{path}: digests.json disagrees with {MANIFEST}")
    for fname, digest in manifest["files"].items():
        if sha256_file(path / fname) != digest:
            raise CheckpointError(f"{path}: file {fname} does not match its recorded sha256")
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    return {
        "model": tensors["model.safetensors"],
        "optimizer": unflatten_optimizer(tensors["optimizer.safetensors"], groups),
        "rng": tensors["rng.safetensors"],
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
        "merkle_root": named_merkle_root(manifest["tensors"]["model.safetensors"]),
        "digest_scheme": scheme,
        "step": int(manifest["step"]),
    }


def rank_rng(flat: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One rank's RNG tensors (rank 0's when the checkpoint had fewer ranks)."""
    key = f"rank{rank}" if f"rank{rank}.cpu" in flat else "rank0"
    return {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(key + ".")}

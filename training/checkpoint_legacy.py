"""Reading checkpoints of format kmoe-train-checkpoint/1: the full (unsharded) state rank 0 wrote before
sharded checkpoints (training/checkpoint.py). Resume, rollback, replay and export still read them.

`step-XXXXXXXX/` holds model.safetensors, config.yaml, digests.json (model/checkpoint.py) plus
  optimizer.safetensors   AdamW moments and step per parameter, as `<param name>/<key>`
  optimizer.json          the optimizer's param groups
  rng.safetensors         torch CPU (and CUDA) RNG state of every rank, as `rank<r>.cpu` / `rank<r>.cuda`
  trainer_state.json      step, data position, spike window, python/numpy RNG
  checkpoint.json         sha256 of every file above and per-tensor digests (under `digest_scheme`; absent:
                          the whole-tensor sha256 of kmoe.hashing.LEGACY_SCHEME)
Loading uses safetensors and JSON only (no pickle) and verifies every tensor and file first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kmoe.hashing import LEGACY_SCHEME, named_merkle_root, sha256_file, state_digests
from model.checkpoint import CheckpointError

FORMAT = "kmoe-train-checkpoint/1"


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, t in tensors.items():
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = t
    return {"state": state, "param_groups": groups}


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


def load(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Read and verify a format-1 checkpoint: every tensor and file against its manifest."""
    scheme = manifest.get("digest_scheme", LEGACY_SCHEME)
    tensors = {f: _check_tensors(path, f, manifest["tensors"][f], scheme) for f in manifest["tensors"]}
    model_digests = json.loads((path / "digests.json").read_text())["tensors"]
    if model_digests != manifest["tensors"]["model.safetensors"]:
        raise CheckpointError(f"{path}: digests.json disagrees with checkpoint.json")
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

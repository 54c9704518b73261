"""kmoe's own model checkpoint format (what training writes and `kmoe export hf` reads).

A model checkpoint is a directory with
  model.safetensors   every parameter and persistent buffer under kmoe's names, in the dtype trained
  config.yaml         the resolved run config; its `model:` section rebuilds the architecture
  digests.json        each tensor's digest under `scheme` (kmoe.hashing.TENSOR_SCHEME; files without a `scheme`
                      hold LEGACY_SCHEME sha256 digests) and their Merkle root
Training checkpoints add optimizer, RNG and data-position files beside these (training/checkpoint.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from kmoe import configtree
from kmoe.hashing import LEGACY_SCHEME, TENSOR_SCHEME, named_merkle_root, state_digests

from .config import ModelConfig, validate_model

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
DIGESTS_FILE = "digests.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its digests."""


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model_dir(
    path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, Any]:
    """Write model.safetensors, config.yaml and digests.json into `path`; returns the digest record."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / MODEL_FILE), metadata={"format": "kmoe"})
    (path / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    digests = state_digests(state, TENSOR_SCHEME)
    record = {"tensors": digests, "merkle_root": named_merkle_root(digests), "scheme": TENSOR_SCHEME}
    (path / DIGESTS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
    return record


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The checkpoint's ModelConfig and its whole resolved config mapping."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a kmoe checkpoint ({CONFIG_FILE} missing)")
    raw = configtree.read_yaml(cfg_file)
    if "model" not in raw:
        raise CheckpointError(f"{cfg_file}: no 'model' section")
    try:
        mcfg = configtree.from_dict(ModelConfig, raw["model"], prefix="model")
    except configtree.ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    validate_model(mcfg)
    return mcfg, raw


def load_model_dir(path: str | Path, verify: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load config and tensors; with `verify`, every tensor must match digests.json (error names it)."""
    path = Path(path)
    mcfg, _ = read_config(path)
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: {MODEL_FILE} missing")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise CheckpointError(f"{weights}: unreadable safetensors file: {e}") from e
    if verify:
        verify_state(path, state)
    return mcfg, state


def verify_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    digest_file = path / DIGESTS_FILE
    if not digest_file.is_file():
        raise CheckpointError(f"{path}: {DIGESTS_FILE} missing, cannot verify")
    record = json.loads(digest_file.read_text())
    recorded, scheme = record["tensors"], record.get("scheme", LEGACY_SCHEME)
    actual = state_digests(state, scheme)
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            raise CheckpointError(f"{path}: tensor '{name}' is recorded in {DIGESTS_FILE} but missing")
        if name not in recorded:
            raise CheckpointError(f"{path}: tensor '{name}' is not recorded in {DIGESTS_FILE}")
        if recorded[name] != actual[name]:
            raise CheckpointError(f"{path}: tensor '{name}' does not match its recorded digest ({scheme})")

"""kmoe's own model checkpoint format (what training writes and `kmoe export hf` reads).

A model checkpoint is a directory with
  model.safetensors   every parameter and persistent buffer under kmoe's names, in the dtype trained, or
  model/*.safetensors the same tensors as blocks, one file per rank that held some (sharded training
                      checkpoints: DCP offsets and each tensor's global shape in the header metadata)
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
from safetensors import safe_open
from safetensors.torch import save_file

from kmoe import configtree
from kmoe.hashing import LEGACY_SCHEME, TENSOR_SCHEME, named_merkle_root, state_digests
from kmoe.safetensors_stream import DTYPE_NAMES, SafetensorsError, read_header

from .config import ModelConfig, validate_model

MODEL_FILE = "model.safetensors"
SHARD_DIR = "model"
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
    """Load config and every tensor whole (one process); with `verify`, every tensor must match
    digests.json (error names it). Tools that must not hold the model read through `open_tensors`."""
    path = Path(path)
    mcfg, _ = read_config(path)
    source = open_tensors(path)
    state = {name: source.read(name) for name in source.names}
    if verify:
        verify_state(path, state)
    return mcfg, state


class TensorSource:
    """Read a checkpoint's model tensors one at a time (or one row of dim 0), whatever its layout."""

    def __init__(self, path: Path, blocks: dict[str, list[tuple[Path, tuple[int, ...], tuple[int, ...]]]],
                 metas: dict[str, tuple[str, tuple[int, ...]]]):  # fmt: skip
        self.path, self.blocks, self.metas = path, blocks, metas
        self.names = sorted(metas)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype name, global shape)."""
        return self.metas[name]

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor, or its row `index` of dim 0, assembled from the blocks that overlap it."""
        dtype, shape = self.metas[name]
        want = (
            [(0, n) for n in shape] if index is None else [(index, index + 1)] + [(0, n) for n in shape[1:]]
        )
        out = torch.empty([b - a for a, b in want], dtype=getattr(torch, dtype))
        filled = 0
        for file, offsets, sizes in self.blocks[name]:
            inter = [(max(a, o), min(b, o + s)) for (a, b), o, s in zip(want, offsets, sizes)]
            if any(lo >= hi for lo, hi in inter):
                continue
            with safe_open(str(file), "pt") as f:
                sl = f.get_slice(name)
                part = (
                    sl[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inter, offsets))]
                    if shape
                    else f.get_tensor(name)
                )
            out[tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, want))] = part
            filled += part.numel()
        if filled != out.numel():
            raise CheckpointError(
                f"{self.path}: tensor '{name}': the shard files hold {filled} of {out.numel()} elements"
            )
        return out if index is None else out[0]


def open_tensors(path: str | Path) -> TensorSource:
    """The model tensors of a checkpoint directory (model.safetensors, or the model/ shard files)."""
    path = Path(path)
    files = (
        [path / MODEL_FILE]
        if (path / MODEL_FILE).is_file()
        else sorted((path / SHARD_DIR).glob("*.safetensors"))
    )
    if not files:
        raise CheckpointError(f"{path}: {MODEL_FILE} missing (and no {SHARD_DIR}/*.safetensors shards)")
    blocks: dict[str, list] = {}
    metas: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        try:
            header, _ = read_header(file)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        extra = header.pop("__metadata__", {}) or {}
        offsets = json.loads(extra.get("DCP_SHARDING_INFO", "{}"))
        shapes = json.loads(extra.get("kmoe_global_shapes", "{}"))
        for name, h in header.items():
            off = tuple(offsets.get(name, {}).get("saved_offsets", [0] * len(h["shape"])))
            blocks.setdefault(name, []).append((file, off, tuple(h["shape"])))
            metas[name] = (DTYPE_NAMES[h["dtype"]], tuple(shapes.get(name, h["shape"])))
    return TensorSource(path, blocks, metas)


def read_digests(path: Path) -> dict[str, Any]:
    """digests.json: {tensors, merkle_root, scheme (absent: LEGACY_SCHEME)}."""
    digest_file = Path(path) / DIGESTS_FILE
    if not digest_file.is_file():
        raise CheckpointError(f"{path}: {DIGESTS_FILE} missing, cannot verify")
    return json.loads(digest_file.read_text())


def verify_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    record = read_digests(path)
    recorded, scheme = record["tensors"], record.get("scheme", LEGACY_SCHEME)
    actual = state_digests(state, scheme)
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            raise CheckpointError(f"{path}: tensor '{name}' is recorded in {DIGESTS_FILE} but missing")
        if name not in recorded:
            raise CheckpointError(f"{path}: tensor '{name}' is not recorded in {DIGESTS_FILE}")
        if recorded[name] != actual[name]:
            raise CheckpointError(f"{path}: tensor '{name}' does not match its recorded digest ({scheme})")

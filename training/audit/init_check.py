"""`kmoe audit init-check RUN_DIR`: rebuild the initial weights from the recorded config and seed.

model/init.py makes every tensor a function of (seed, name, shape, config) alone, so the genesis record's
per-tensor digests (under the scheme it names; legacy sha256 when it names none) can be recomputed by anyone
with the code: a match shows the run began from the claimed
random initialisation and not from some other weights. Tensors are rebuilt one at a time (the model is
built on the meta device for names and shapes), so memory stays at one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kmoe import configtree
from kmoe.hashing import LEGACY_SCHEME, digest_as, named_merkle_root
from model import MoETransformer
from model.config import ModelConfig, validate_model
from model.init import init_value
from training.ledger_chain import LEDGER_FILE, read_lines


@dataclass
class InitCheck:
    seed: int | None = None
    tensors: int = 0
    recorded_root: str | None = None
    rebuilt_root: str | None = None
    findings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def read_genesis(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger")
    lines = read_lines(path)
    rec = lines[0].record if lines else None
    if not rec or rec.get("kind") != "genesis":
        raise ValueError(f"{path}: line 1 is not a genesis record")
    return rec


def rebuild_init_digests(mcfg: ModelConfig, seed: int, scheme: str) -> dict[str, str]:
    """Per-tensor digests (under `scheme`) of the weights `init_weights(MoETransformer(mcfg), mcfg, seed)`
    produces."""
    with torch.device("meta"):
        model = MoETransformer(mcfg)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    return {
        name: digest_as(init_value(name, shape, mcfg, seed), scheme) for name, shape in sorted(shapes.items())
    }


def init_check(run_dir: str | Path) -> InitCheck:
    g = read_genesis(run_dir)
    res = InitCheck(seed=g.get("seed"))
    init = g.get("init") or {}
    recorded: dict[str, str] = init.get("tensors") or {}
    res.recorded_root, res.tensors = init.get("merkle_root"), len(recorded)
    if named_merkle_root(recorded) != res.recorded_root:
        res.findings.append("seq 0 (genesis): init merkle_root does not match its own per-tensor digests")
    if not isinstance(res.seed, int):
        res.findings.append(f"seq 0 (genesis): seed {res.seed!r} is not an integer")
        return res
    try:
        mcfg = configtree.from_dict(ModelConfig, (g.get("config") or {}).get("model") or {}, prefix="model")
        validate_model(mcfg)
    except (configtree.ConfigError, ValueError) as e:
        res.findings.append(f"seq 0 (genesis): recorded config cannot rebuild the model: {e}")
        return res
    try:
        rebuilt = rebuild_init_digests(mcfg, res.seed, init.get("scheme", LEGACY_SCHEME))
    except ValueError as e:  # an unknown scheme
        res.findings.append(f"seq 0 (genesis): {e}")
        return res
    res.rebuilt_root = named_merkle_root(rebuilt)
    differ = sorted(n for n in set(rebuilt) | set(recorded) if rebuilt.get(n) != recorded.get(n))
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        res.findings.append(
            f"seq 0 (genesis): {len(differ)} of {len(rebuilt)} tensors rebuilt from seed {res.seed} do not "
            f"match the recorded init digests: {shown}"
        )
    return res

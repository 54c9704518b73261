"""`kmoe audit replay RUN_DIR --from-step K --steps N`: re-execute recorded steps, Proof-of-Learning style.

Loads the checkpoint recorded at step K, re-reads each recorded batch by its sample indices, checks it against
the recorded batch hash, runs the step, compares loss and grad norm with the record, and after N steps compares
the weights with the checkpoint recorded at step K+N: bitwise where the environment matches (CPU, fp32, same
versions), otherwise as the distance to that checkpoint relative to the size of the update since step K, which
must stay below `tolerance`. Reports the first step that diverges.

The training program supplies a `ReplayEngine`, registered under the `trainer` name its genesis record carries
(`register_engine`): `kmoe train` records `kmoe-train` (training/audit/trainer_replay.py), the reference loop
(training/audit/minirun.py) `kmoe-minirun`. A skipped step (a `skip_step` event) is replayed like any other.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from kmoe.hashing import LEGACY_SCHEME, named_merkle_root, state_digests, tensor_digest
from training.audit.init_check import read_genesis
from training.ledger_chain import LEDGER_FILE, read_lines, walk_chain

log = logging.getLogger(__name__)
DEFAULT_TOLERANCE = 1e-3  # |theta_replay - theta_recorded| / |theta_recorded - theta_K| when not bitwise


class ReplayEngine(Protocol):
    """What a training program provides so its steps can be re-executed."""

    def load(self, checkpoint_dir: Path) -> None:
        """Model, optimizer, RNG and any state a step depends on, exactly as saved."""

    def batch(self, samples: dict[str, Any]) -> torch.Tensor:
        """The global batch a step record's `samples` names, re-read from the data (hash checked by replay)."""

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        """One optimizer step on `batch`; returns at least `loss` and `grad_norm` as the ledger records them."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """The current weights under checkpoint names."""


ENGINES: dict[str, Callable[..., ReplayEngine]] = {}
# trainer name (genesis `trainer`) -> module that calls register_engine on import
ENGINE_MODULES = {
    "kmoe-train": "training.audit.trainer_replay",
    "kmoe": "training.audit.trainer_replay",  # the Ledger's default name: what `kmoe train` wrote before naming itself
    "kmoe-minirun": "training.audit.minirun",
}


def register_engine(trainer: str, factory: Callable[..., ReplayEngine]) -> None:
    """`factory(run_dir, shards=None)` builds the engine; `shards` relocates the run's data when given."""
    ENGINES[trainer] = factory


@dataclass
class ReplayResult:
    from_step: int
    to_step: int
    target: str  # the checkpoint compared against
    first_divergence: int | None = None
    divergences: list[str] = field(default_factory=list)
    bitwise: bool = False
    relative_distance: float | None = None
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def ok(self) -> bool:
        return not self.divergences


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """Records as written; replay checks the computation, `verify` the chain (a broken one is only logged)."""
    chain = walk_chain(read_lines(run_dir / LEDGER_FILE))
    if chain.findings:
        log.warning(
            "%s: ledger chain is broken (%s); `kmoe audit verify` reports it", run_dir, chain.findings[0]
        )
    return [r for _, r in chain.records]


def _trajectory(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Step records and skipped steps as they stand: a step redone after a resume or rollback wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in recs:
        counted = r.get("kind") == "step" or (r.get("kind") == "event" and r.get("event") == "skip_step")
        if counted and isinstance(r.get("step"), int):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def resolve_span(
    run_dir: Path, from_step: int, steps: int | None, recs: list[dict[str, Any]] | None = None
) -> tuple[int, int]:
    """A negative `from_step` counts back over the checkpoints still on disk (-2: the second-to-last);
    `steps` None means up to the next recorded checkpoint still on disk."""
    recs = _records(run_dir) if recs is None else recs
    on_disk = sorted(
        {r["step"] for r in recs if r.get("kind") == "checkpoint" and (run_dir / str(r.get("path"))).is_dir()}
    )
    if from_step < 0:
        if len(on_disk) < -from_step:
            raise ValueError(f"{run_dir}: --from-step {from_step} but checkpoints on disk are {on_disk}")
        from_step = on_disk[from_step]
    if steps is None:
        later = [s for s in on_disk if s > from_step]
        if not later:
            raise ValueError(f"{run_dir}: no checkpoint on disk after step {from_step} (on disk: {on_disk})")
        steps = later[0] - from_step
    return from_step, steps


def plan(
    run_dir: Path, from_step: int, steps: int, recs: list[dict[str, Any]] | None = None
) -> tuple[dict, list[dict], dict]:
    """The start checkpoint record, the N step records to replay and the target checkpoint record."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    recs = _records(run_dir) if recs is None else recs
    ckpts = {r["step"]: r for r in recs if r.get("kind") == "checkpoint"}  # the latest record per step wins
    if from_step not in ckpts or from_step + steps not in ckpts:
        raise ValueError(
            f"{run_dir}: replay needs checkpoints at steps {from_step} and {from_step + steps}; "
            f"recorded checkpoints: {sorted(ckpts)}"
        )
    todo = [r for r in _trajectory(recs) if from_step < r["step"] <= from_step + steps]
    if [r["step"] for r in todo] != list(range(from_step + 1, from_step + steps + 1)):
        raise ValueError(f"{run_dir}: steps {from_step + 1}..{from_step + steps} are not all recorded")
    return ckpts[from_step], todo, ckpts[from_step + steps]


def _same(recorded: Any, value: float) -> bool:
    if isinstance(recorded, str):  # "nan"/"inf" as the ledger writes non-finite values
        return not math.isfinite(value) and str(float(recorded)) == str(value)
    return recorded == value


def replay(
    run_dir: str | Path,
    from_step: int,
    steps: int | None,
    tolerance: float = DEFAULT_TOLERANCE,
    shards: str | None = None,
) -> ReplayResult:
    run_dir = Path(run_dir)
    recs = _records(run_dir)
    from_step, steps = resolve_span(run_dir, from_step, steps, recs)
    start, todo, target = plan(run_dir, from_step, steps, recs)
    trainer = read_genesis(run_dir).get("trainer", "kmoe")
    if trainer not in ENGINES and trainer in ENGINE_MODULES:
        importlib.import_module(ENGINE_MODULES[trainer])
    if trainer not in ENGINES:
        raise ValueError(f"no replay engine registered for trainer {trainer!r} (known: {sorted(ENGINES)})")
    engine = ENGINES[trainer](run_dir, **({"shards": shards} if shards else {}))
    engine.load(run_dir / start["path"])
    theta0 = {k: v.clone() for k, v in engine.model_state().items()}
    res = ReplayResult(from_step, from_step + steps, target["path"], tolerance=tolerance)
    for rec in todo:
        batch = engine.batch(rec.get("samples") or {"list": rec.get("sample_indices") or []})
        if tensor_digest(batch) != rec.get("batch_hash"):
            res.divergences.append(
                f"step {rec['step']} (seq {rec['seq']}): re-read batch does not match its hash"
            )
        out = engine.step(batch)
        for key in ("loss", "grad_norm"):
            if not _same(rec.get(key), out[key]):
                res.divergences.append(
                    f"step {rec['step']} (seq {rec['seq']}): {key} {out[key]!r} != recorded {rec.get(key)!r}"
                )
        if res.divergences and res.first_divergence is None:
            res.first_divergence = rec["step"]
    _compare_weights(res, engine.model_state(), theta0, target, run_dir)
    return res


def _compare_weights(res: ReplayResult, state: dict, theta0: dict, target: dict, run_dir: Path) -> None:
    # the target's roots are over digests of the scheme its record names (none: a ledger from before schemes)
    root = named_merkle_root(state_digests(state, target.get("digest_scheme", LEGACY_SCHEME)))
    res.bitwise = root == (target.get("roots") or {}).get("model")
    if res.bitwise:
        return
    from model.checkpoint import load_model_dir

    _, recorded = load_model_dir(run_dir / target["path"])  # an absolute recorded path stays absolute
    num = sum(float((state[k].double() - recorded[k].double()).norm() ** 2) for k in recorded)
    den = sum(float((recorded[k].double() - theta0[k].double()).norm() ** 2) for k in recorded)
    res.relative_distance = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    if res.relative_distance > res.tolerance:
        res.divergences.append(
            f"weights after step {res.to_step} differ from {target['path']} (seq {target['seq']}): relative "
            f"distance {res.relative_distance:.3e} > tolerance {res.tolerance:g}"
        )

"""`kmoe audit replay RUN_DIR --from-step K --steps N`: re-execute recorded steps, Proof-of-Learning style.

Loads the checkpoint recorded at step K, re-reads each recorded batch by its sample indices, checks it against
the recorded batch hash, runs the step, compares loss and grad norm with the record, and after N steps compares
the weights with the checkpoint recorded at step K+N. First it sets this process to the numerical environment
the genesis records (training/numerics.py: thread count, deterministic settings) and names what it cannot set
(torch build, CPU ISA, device, world size). Bit for bit is the expected outcome where all of it holds;
otherwise, or where something unrecorded differs, the verdict is by tolerance: each step's loss and grad norm
within `step_tolerance` (relative) of the record, and the weights' distance to the checkpoint relative to the
size of the update since step K below `tolerance`. Float-order noise stays orders of magnitude below both; a
changed batch or changed weights does not (docs/ledger.md has the measurements). `exact` demands bits.
Reports the first step that diverges.

The training program supplies a `ReplayEngine`, registered under the `trainer` name its genesis record carries
(`register_engine`): `kmoe train` records `kmoe-train` (training/audit/trainer_replay.py). Runs of the retired
reference loop `kmoe-minirun` (a second training loop the audit tests once used) are refused with a message
saying so. A skipped step (a `skip_step` event) is replayed like any other.
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
from training import numerics
from training.audit.init_check import read_genesis
from training.ledger_chain import LEDGER_FILE, read_lines, walk_chain

log = logging.getLogger(__name__)
DEFAULT_TOLERANCE = 1e-3  # |theta_replay - theta_recorded| / |theta_recorded - theta_K| when not bitwise
DEFAULT_STEP_TOLERANCE = 1e-3  # |replayed - recorded| / |recorded| of each step's loss and grad norm


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
}
# trainers whose runs can no longer be replayed, and why
RETIRED = {
    "kmoe-minirun": "the reference loop training/audit/minirun.py was removed (one training loop: `kmoe train`); "
    "replay works on runs written by `kmoe train`",
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
    step_tolerance: float = DEFAULT_STEP_TOLERANCE
    max_deviation: dict[str, float] = field(default_factory=dict)  # largest relative step deviation per key
    step_deviation: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> key -> deviation
    environment_set: list[str] = field(default_factory=list)  # recorded settings this process was set to
    environment_differs: list[str] = field(default_factory=list)  # recorded facts that do not hold here

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


def deviation(recorded: Any, value: float) -> float:
    """Relative deviation of a replayed value from the recorded one: 0 when identical, inf when only one of
    them is finite or a value is missing ("nan"/"inf" are how the ledger writes non-finite values)."""
    try:
        rec = float(recorded)
    except (TypeError, ValueError):
        return math.inf
    if not (math.isfinite(rec) and math.isfinite(value)):
        return 0.0 if str(rec) == str(value) else math.inf
    return 0.0 if rec == value else abs(value - rec) / max(abs(rec), 1e-30)


def _engine(run_dir: Path, trainer: str, shards: str | None) -> ReplayEngine:
    if trainer not in ENGINES and trainer in ENGINE_MODULES:
        importlib.import_module(ENGINE_MODULES[trainer])
    if trainer not in ENGINES:
        raise ValueError(f"no replay engine registered for trainer {trainer!r} (known: {sorted(ENGINES)})")
    return ENGINES[trainer](run_dir, **({"shards": shards} if shards else {}))


def replay(
    run_dir: str | Path,
    from_step: int,
    steps: int | None,
    tolerance: float = DEFAULT_TOLERANCE,
    shards: str | None = None,
    step_tolerance: float = DEFAULT_STEP_TOLERANCE,
    threads: int | None = None,
    exact: bool = False,
) -> ReplayResult:
    """Re-execute steps from_step+1..from_step+steps (see the module doc). `threads` replays at that
    intra-op thread count instead of the recorded one; `exact` fails on any bit of difference."""
    run_dir = Path(run_dir)
    retired = RETIRED.get(read_genesis(run_dir).get("trainer", "kmoe"))
    if retired:
        raise ValueError(f"{run_dir}: its genesis names a trainer that cannot be replayed: {retired}")
    recs = _records(run_dir)
    from_step, steps = resolve_span(run_dir, from_step, steps, recs)
    start, todo, target = plan(run_dir, from_step, steps, recs)
    genesis = read_genesis(run_dir)
    env = genesis.get("environment") or {}
    res = ReplayResult(from_step, from_step + steps, target["path"], tolerance=tolerance,
                       step_tolerance=0.0 if exact else step_tolerance)  # fmt: skip
    with numerics.reproduced(env.get("numerics"), threads) as rep:
        res.environment_set, res.environment_differs = rep.set, list(rep.differs)
        if int(env.get("world_size") or 1) > 1:
            res.environment_differs.append(
                f"world size {env['world_size']} recorded, replayed in 1 process (another summation order)"
            )
        engine = _engine(run_dir, genesis.get("trainer", "kmoe"), shards)
        engine.load(run_dir / start["path"])
        theta0 = {k: v.clone() for k, v in engine.model_state().items()}
        for rec in todo:
            _replay_step(res, engine, rec)
        _compare_weights(res, engine.model_state(), theta0, target, run_dir, exact)
    return res


def _replay_step(res: ReplayResult, engine: ReplayEngine, rec: dict[str, Any]) -> None:
    where = f"step {rec['step']} (seq {rec['seq']})"
    batch = engine.batch(rec.get("samples") or {"list": rec.get("sample_indices") or []})
    if tensor_digest(batch) != rec.get("batch_hash"):
        res.divergences.append(f"{where}: re-read batch does not match its hash")
    out = engine.step(batch)
    for key in ("loss", "grad_norm"):
        dev = deviation(rec.get(key), out[key])
        res.step_deviation.setdefault(rec["step"], {})[key] = dev
        res.max_deviation[key] = max(res.max_deviation.get(key, 0.0), dev)
        if dev > res.step_tolerance:
            res.divergences.append(
                f"{where}: {key} {out[key]!r} != recorded {rec.get(key)!r} (relative deviation {dev:.1e} > "
                f"step tolerance {res.step_tolerance:g})"
            )
    if res.divergences and res.first_divergence is None:
        res.first_divergence = rec["step"]


def _compare_weights(
    res: ReplayResult, state: dict, theta0: dict, target: dict, run_dir: Path, exact: bool = False
) -> None:
    # the target's roots are over digests of the scheme its record names (none: a ledger from before schemes)
    root = named_merkle_root(state_digests(state, target.get("digest_scheme", LEGACY_SCHEME)))
    res.bitwise = root == (target.get("roots") or {}).get("model")
    if res.bitwise:
        return
    if exact:
        res.divergences.append(
            f"weights after step {res.to_step} are not bit for bit {target['path']} (--exact)"
        )
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

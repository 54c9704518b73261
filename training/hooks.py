"""Hook points the trainer calls for the audit record; training/ledger.py's `Ledger` implements them.

The signatures mirror the ledger's (issue 6) so it plugs in as is; `NullLedger` accepts every call and
records nothing. Only rank 0 calls a ledger. What the trainer sends:
  genesis       once before the first step of a fresh run (config, seed, initial weight digests, data root)
  step          every applied optimizer step (cumulative tokens, loss, grad norm, lr, batch identity, load)
  checkpoint    after a checkpoint directory is complete (Merkle roots of model/optimizer/rng/data position)
  event         skip_step, resume, rollback, signal, checkpoint_deleted, eval, expert_dead
  weights_load  when weights are read from a checkpoint (resume, rollback)
  close         at the end ("completed") or after a stop signal ("requeue")
And questions on a restart: `has_genesis` (a restart without a checkpoint records a `restart` event, not
a second genesis, its weights digested under the genesis record's `init_scheme`) and `recorded_checkpoints` (a checkpoint written but never recorded, because the process
died in between, is set aside rather than resumed from; None: nothing to reconcile with). `identity` (head hash,
key id, records) goes to the wandb summary after every checkpoint and at the end, tying the two records.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol


class LedgerHook(Protocol):
    def genesis(
        self, *, config: dict[str, Any], seed: int, init_state: Mapping[str, Any], **kw: Any
    ) -> Any: ...
    def step(self, step: int, *, tokens: int, loss: float, grad_norm: float, lr: float, **kw: Any) -> Any: ...
    def checkpoint(
        self, step: int, path: str | Path, *, tokens: int, roots: dict[str, str], **kw: Any
    ) -> Any: ...
    def event(self, kind: str, **fields: Any) -> Any: ...
    def weights_load(self, path: str | Path, model_root: str, purpose: str) -> Any: ...
    def close(self, status: str = "completed") -> None: ...
    def has_genesis(self) -> bool: ...
    def init_scheme(self) -> str: ...
    def recorded_checkpoints(self) -> set[str] | None: ...
    def identity(self) -> dict[str, Any]: ...


class NullLedger:
    """The default: records nothing."""

    def genesis(self, **_: Any) -> None:
        pass

    def step(self, step: int, **_: Any) -> None:
        pass

    def checkpoint(self, step: int, path: str | Path, **_: Any) -> None:
        pass

    def event(self, kind: str, **_: Any) -> None:
        pass

    def weights_load(self, path: str | Path, model_root: str, purpose: str) -> None:
        pass

    def close(self, status: str = "completed") -> None:
        pass

    def has_genesis(self) -> bool:
        return False

    def init_scheme(self) -> str:
        from kmoe.hashing import TENSOR_SCHEME

        return TENSOR_SCHEME

    def recorded_checkpoints(self) -> set[str] | None:
        return None

    def identity(self) -> dict[str, Any]:
        return {}

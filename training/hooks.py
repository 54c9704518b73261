"""Hook points the trainer calls for the audit record; the ledger (training/ledger.py) implements them.

The trainer never depends on a ledger being present: `NullLedger` accepts every call and does nothing.
Arguments are plain JSON-able values (str, int, float, lists, dicts) so a ledger can hash them as given.
"""

from __future__ import annotations

from typing import Any, Protocol


class LedgerHook(Protocol):
    def genesis(self, *, config: dict[str, Any], config_hash: str, seed: int, init_digests: dict[str, str],
                data: dict[str, Any], world_size: int) -> None:  # fmt: skip
        """Once, before the first step of a fresh run: what the run starts from."""

    def step(self, *, step: int, loss: float, lr: float, grad_norm: float, skipped: bool,
             batch_indices: list[int], batch_sha256: str, extra: dict[str, Any]) -> None:  # fmt: skip
        """After every optimizer step (or skipped step) with the global batch it consumed."""

    def checkpoint(self, *, step: int, path: str, digests: dict[str, str], merkle_root: str) -> None:
        """After a checkpoint directory is complete (renamed into place)."""

    def event(self, kind: str, **fields: Any) -> None:
        """Anything else an auditor should see: resume, rollback, nan skip, spike, signal, eval, alarm."""


class NullLedger:
    """The default: records nothing."""

    def genesis(self, **_: Any) -> None:
        pass

    def step(self, **_: Any) -> None:
        pass

    def checkpoint(self, **_: Any) -> None:
        pass

    def event(self, kind: str, **_: Any) -> None:
        pass

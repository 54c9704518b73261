"""Replay engine of `kmoe train` runs (genesis `trainer: kmoe-train`), for `kmoe audit replay`.

Nothing here re-implements the training math: a `Trainer` is built from the checkpoint's resolved config
(no ledger, no metrics file, nothing written to the run directory), the checkpoint is loaded by the same
`Trainer.load_checkpoint_state` a resume uses (model, optimizer, router bias, data position, spike window,
RNG), each recorded batch is re-read from the shards by its recorded sample indices, and the step runs
through `Trainer.apply_batch`, the function training calls. Bitwise agreement needs the recorded layout:
one process (a multi-rank run replays on one process with a different summation order, so it is judged by
the tolerance), CPU, fp32, the same library versions and thread count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from kmoe import configtree
from training.audit.init_check import read_genesis
from training.audit.replay import register_engine
from training.config import RunConfig
from training.data import GlobalBatch
from training.parallel import DistInfo
from training.trainer import TRAINER, Trainer

log = logging.getLogger(__name__)


def sample_indices(samples: dict[str, Any]) -> list[int]:
    """The indices a step record's `samples` ({start, count} or {list}) names."""
    if "list" in samples:
        return [int(i) for i in samples["list"]]
    return list(range(int(samples["start"]), int(samples["start"]) + int(samples["count"])))


class _ReplayTrainer(Trainer):
    def _rollback(self, batch: GlobalBatch, loss: float) -> bool:
        """A spike during replay is a divergence to report, never a reason to reload from the run dir."""
        log.warning("replay: loss spike at batch %d (%s); not rolling back", batch.index, loss)
        return False


class TrainerReplay:
    """`ReplayEngine` over the kmoe trainer (see training/audit/replay.py)."""

    def __init__(self, run_dir: Path, shards: str | None = None):
        self.run_dir, self.shards = Path(run_dir), shards
        self.trainer: Trainer | None = None
        self._pending: GlobalBatch | None = None
        self.same_layout = True  # the recorded run had one process, as replay does: bitwise expected

    def load(self, checkpoint_dir: Path) -> None:
        raw = configtree.read_yaml(checkpoint_dir / "config.yaml")  # the config the run was under then
        if self.shards:
            raw.setdefault("data", {})["shards"] = self.shards
        raw.setdefault("parallel", {})["strategy"] = (
            "single"  # one process: the sharded state loads resharded
        )
        cfg = configtree.from_dict(RunConfig, raw)
        info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        trainer = _ReplayTrainer(cfg, self.run_dir, info)  # NullLedger: replay records nothing
        trainer.build(write_metrics=False)
        recorded = (read_genesis(self.run_dir).get("data") or {}).get("manifest_root")
        found = trainer.data.manifest.get("root_hash")
        if recorded and found != recorded:
            log.warning(
                "replay: data manifest root %s differs from the genesis record's %s; batch hashes decide",
                found,
                recorded,
            )
        loaded = trainer.load_checkpoint_state(checkpoint_dir)
        self.same_layout = loaded["trainer_state"].get("world_size", 1) == 1
        self.trainer = trainer

    def batch(self, samples: dict[str, Any]) -> torch.Tensor:
        """The recorded batch re-read from the shards; its token ids as the ledger's `batch_hash` covers."""
        assert self.trainer is not None
        idx = sample_indices(samples)
        g = self.trainer.cfg.train.global_batch_size
        self._pending = self.trainer.data.batch_of(idx[0] // g if idx else -1, idx)
        return torch.cat([self._pending.tokens_GS, self._pending.labels_GS[:, -1:]], dim=1).to(torch.int32)

    def step(self, batch: torch.Tensor) -> dict[str, float]:
        assert self.trainer is not None and self._pending is not None
        gb, self._pending = self._pending, None
        self.trainer.state.batch_cursor = gb.index + 1  # where `_next_batch` leaves it
        out = self.trainer.apply_batch(gb)
        assert out is not None  # _ReplayTrainer never rolls back
        return {"loss": out.loss, "grad_norm": out.grad_norm}

    def model_state(self) -> dict[str, torch.Tensor]:
        assert self.trainer is not None
        return self.trainer.engine.state_dict()["model"]


register_engine(TRAINER, TrainerReplay)
register_engine("kmoe", TrainerReplay)  # runs of `kmoe train` from before it named itself in genesis

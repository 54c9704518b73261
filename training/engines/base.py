"""The engine interface: everything the trainer needs from a model + optimizer + parallel layout.

The trainer owns the loop, data position, schedule, signals, checkpoint cadence, metrics and ledger; an
engine owns the model's forward/backward (a pipeline schedule included), the optimizer step, its state and
its process groups. The trainer learns the layout from `dims` alone: it gives each data-parallel rank its
slice of the global batch, reduces loss statistics from the ranks that hold the loss, and stop flags over
the world. docs/engines.md describes the contract for engine authors; tests/distributed/test_engine_contract.py
checks it for every engine and layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..dims import ParallelDims, layout

Group = Literal["world", "dp"]


@dataclass
class MicroBatch:
    tokens_BS: torch.Tensor
    labels_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    loss_scale: float  # multiplies the summed token loss: dp_size / loss tokens of the whole global batch
    aux_scale: float  # multiplies the model's aux loss: 1 / micro-batches per data-parallel rank
    last: bool  # last micro-batch of the step on this rank (gradient sync happens here)


@dataclass
class LossStats:
    """Sums over the micro-batches an engine ran on this rank.

    `loss_sum` and `tokens` count where `dims.holds_loss` (elsewhere they may be anything; the trainer
    ignores them). `aux_loss` is the aux loss of the layers this rank holds, summed over its micro-batches,
    counted once per data-parallel replica: an engine returns 0 on ranks whose layers another rank of the
    same replica already reports (tensor/context-parallel peers), and each pipeline stage its own layers'.
    """

    loss_sum: float  # summed token cross-entropy (fp64 on the host)
    tokens: float  # loss tokens
    aux_loss: float = 0.0  # the model's aux loss (balance + z), 0 when disabled

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(
            self.loss_sum + other.loss_sum, self.tokens + other.tokens, self.aux_loss + other.aux_loss
        )


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping (over every rank's shard of every parameter)
    applied: bool  # False when the gradient was not finite (nothing was changed)
    expert_load_LE: torch.Tensor  # tokens per expert [L_moe, E] of this step over the whole global batch


class Engine(ABC):
    """One model under one parallel layout.

    Contract (checked by tests/distributed/test_engine_contract.py):
    - `dims` tells the trainer the layout; `layout()` reports it as `training.dims.layout` does for the
      config (what `validate` accepted and `--dry-run` printed);
    - a layout the engine does not implement is refused before any compute, naming the `parallel.*` key;
    - `train_batch` runs all micro-batches of a step (it may own the schedule) and accumulates gradients;
      `step` updates from them and the router bias from the expert load of the whole global batch, so every
      layout takes the same step; `discard` forgets them;
    - `param_digests` do not depend on the layout: the same weights give the same digests everywhere.
    """

    cfg: Any  # the RunConfig the engine was built for

    @property
    @abstractmethod
    def dims(self) -> ParallelDims:
        """This rank's place in the layout: data-parallel rank/size/group, ep/tp/pp/cp, `holds_loss`."""

    @abstractmethod
    def build(self, seed: int) -> None:
        """Build the model (initialised from `seed`) and the optimizer."""

    @abstractmethod
    def train_batch(self, micro_batches: list[MicroBatch]) -> LossStats:
        """Forward and backward this rank's micro-batches of one step, accumulating gradients (and the
        expert load); returns their summed statistics. Every rank of the layout calls it."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, optimizer step at `lr`, zero grads, router-bias update from the globally reduced expert load."""

    @abstractmethod
    def discard(self) -> None:
        """Drop accumulated gradients and expert load (a skipped step)."""

    @abstractmethod
    def evaluate(
        self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor
    ) -> LossStats:
        """Loss of a batch without gradients (model in eval mode); meaningful where `dims.holds_loss`.
        Every rank of a data-parallel replica calls it with the same batch."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """{"model": full state by kmoe name, "optimizer": {"state": {name: {k: tensor}}, "param_groups": [...]}}.

        Collective: every rank calls it; only rank 0 is guaranteed to get the values.
        """

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full (unsharded) state as `state_dict` returns it, whatever the layout was."""

    @abstractmethod
    def param_digests(self) -> dict[str, str]:
        """Layout-independent digest (kmoe.hashing.TENSOR_SCHEME) of every parameter and persistent buffer,
        by kmoe name, identical on every rank. Collective: each rank hashes what it holds
        (training.digests.sharded_digests); no tensor is gathered."""

    @abstractmethod
    def all_reduce(self, values: list[float], op: str = "sum", group: Group = "world") -> list[float]:
        """Reduce a few host floats (sum or max) over all ranks or over this rank's data-parallel group;
        identical on every rank of the group."""

    def layout(self) -> dict[str, Any]:
        """The layout as the ledger and checkpoints record it (`training.dims.layout` of the config)."""
        return layout(self.cfg, self.dims.world)

"""The engine interface: everything the trainer needs from a model + optimizer + parallel layout.

The trainer owns the loop, data position, schedule, signals, checkpoint cadence, metrics and ledger; an
engine owns the model's forward/backward, the optimizer step and its state. Keep it this small so
megatron-core and DeepSpeed engines can implement it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MicroBatch:
    tokens_BS: torch.Tensor
    labels_BS: torch.Tensor
    loss_mask_BS: torch.Tensor
    loss_scale: float  # multiplies the summed token loss: dp_size / loss tokens of the whole global batch
    aux_scale: float  # multiplies the model's aux loss: 1 / micro-batches on this rank
    last: bool  # last micro-batch of the step on this rank (gradient sync happens here)


@dataclass
class LossStats:
    loss_sum: float  # summed token cross-entropy of the micro-batch (fp64 on the host)
    tokens: float  # loss tokens in the micro-batch
    aux_loss: float  # the model's aux loss (balance + z), 0 when disabled


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping
    applied: bool  # False when the gradient was not finite (nothing was changed)
    expert_load_LE: torch.Tensor  # tokens per expert this step, all-reduced over data-parallel ranks


class Engine(ABC):
    """One model under one parallel layout."""

    @abstractmethod
    def build(self, seed: int) -> None:
        """Build the model (initialised from `seed`) and the optimizer."""

    @abstractmethod
    def forward_backward(self, micro: MicroBatch) -> LossStats:
        """Forward and backward one micro-batch, accumulating gradients."""

    @abstractmethod
    def step(self, lr: float) -> StepResult:
        """Clip, optimizer step at `lr`, zero grads, router-bias update from the all-reduced expert load."""

    @abstractmethod
    def discard(self) -> None:
        """Drop accumulated gradients and expert load (a skipped step)."""

    @abstractmethod
    def evaluate(
        self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor
    ) -> LossStats:
        """Loss of a batch without gradients (model in eval mode)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """{"model": {kmoe name: tensor}, "optimizer": {"state": {name: {slot: tensor}}, "param_groups": [...]}}
        as this rank holds it: DTensors (Shard/Replicate placements, global shapes, kmoe names) for sharded
        layouts, plain tensors where every rank holds the whole tensor. Never gathers; tensors may be views
        of the live state, so loading into them (DCP) fills the model. Collective on some layouts."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], full: bool = False) -> None:
        """Load a state shaped as `state_dict` returns it (`full`: whole tensors on every rank, as format-1
        checkpoints hold them, whatever layout saved them)."""

    @abstractmethod
    def param_digests(self) -> dict[str, str]:
        """Layout-independent digest (kmoe.hashing.TENSOR_SCHEME) of every parameter and persistent buffer,
        by kmoe name, identical on every rank. Collective: each rank hashes what it holds
        (training.digests.sharded_digests); no tensor is gathered."""

    @abstractmethod
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few host floats over all ranks (sum or max), identical on every rank."""

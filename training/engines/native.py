"""The native engine: kmoe's own model in plain PyTorch, on one process, DDP or FSDP2 (training/parallel.py)."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import optim
from ..config import RunConfig, validate
from ..digests import sharded_digests
from ..dims import ParallelDims, data_parallel_dims, native_strategy
from ..parallel import DistInfo, build_model
from .base import Engine, Group, LossStats, MicroBatch, StepResult

log = logging.getLogger(__name__)


class NativeEngine(Engine):
    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        validate(cfg, world_size=info.world)  # a layout this engine lacks is refused here, naming the key
        self.strategy = native_strategy(cfg, info.world)
        if cfg.train.precision == "bf16" and info.device.type != "cuda":
            raise ValueError("train.precision: bf16 needs a GPU; CPU runs train in fp32")
        self._dims = data_parallel_dims(info.rank, info.world, ep=cfg.parallel.expert_parallel)

    @property
    def dims(self) -> ParallelDims:
        return self._dims

    def build(self, seed: int) -> None:
        self.wrapped, self.model = build_model(self.cfg, self.info, seed)
        self.wrapped.train()
        self.optimizer = optim.build_optimizer(self.wrapped, self.cfg.train)
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]

    def _autocast(self):
        if self.cfg.train.precision == "bf16" and self.strategy != "fsdp":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32, or FSDP2's MixedPrecisionPolicy casts the params

    def _sync(self, last: bool):
        if self.strategy == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _loss_sum(self, tokens_BS, labels_BS, mask_BS):
        dev = self.info.device
        tokens_BS, labels_BS, mask_BS = tokens_BS.to(dev), labels_BS.to(dev), mask_BS.to(dev)
        with self._autocast():
            out = self.wrapped(tokens_BS)
        ce_T = F.cross_entropy(out.logits.float().flatten(0, 1), labels_BS.flatten(), reduction="none")
        return (ce_T * mask_BS.flatten()).sum(), mask_BS.sum(), out.aux_loss

    def train_batch(self, micro_batches: list[MicroBatch]) -> LossStats:
        total = LossStats(0.0, 0.0, 0.0)
        for micro in micro_batches:
            total = total + self._forward_backward(micro)
        return total

    def _forward_backward(self, micro: MicroBatch) -> LossStats:
        with self._sync(micro.last):
            ce_sum, tokens, aux = self._loss_sum(micro.tokens_BS, micro.labels_BS, micro.loss_mask_BS)
            loss = ce_sum * micro.loss_scale
            if aux is not None:
                loss = loss + aux * micro.aux_scale
            loss.backward()
        return LossStats(ce_sum.item(), tokens.item(), 0.0 if aux is None else aux.item())

    def step(self, lr: float) -> StepResult:
        norm = optim.grad_norm(self.params)
        loads = self.model.expert_load().to(torch.float64)
        if self.info.initialized:
            dist.all_reduce(loads)
        if not math.isfinite(norm):
            self.discard()
            return StepResult(norm, False, loads.cpu())
        optim.clip_(self.params, self.cfg.train.grad_clip, norm)
        optim.set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_router_bias(loads)  # the same all-reduced load on every rank
        return StepResult(norm, True, loads.cpu())

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.model.moe_layers():
            m.load_E.zero_()

    @torch.no_grad()
    def evaluate(self, tokens_BS, labels_BS, loss_mask_BS) -> LossStats:
        self.wrapped.eval()
        try:
            ce_sum, tokens, _ = self._loss_sum(tokens_BS, labels_BS, loss_mask_BS)
        finally:
            self.wrapped.train()
        return LossStats(float(ce_sum), float(tokens), 0.0)

    def state_dict(self) -> dict[str, Any]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model = get_model_state_dict(self.wrapped, options=opts)
        optimizer = get_optimizer_state_dict(self.wrapped, self.optimizer, options=opts)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.wrapped, state["model"], options=opts)
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=opts)
        for m in self.model.moe_layers():
            m.load_E.zero_()

    def param_digests(self) -> dict[str, str]:
        return sharded_digests(get_model_state_dict(self.wrapped))  # DTensor shards under FSDP2: no gather

    def all_reduce(self, values: list[float], op: str = "sum", group: Group = "world") -> list[float]:
        if not self.info.initialized:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        pg = self.dims.dp_group if group == "dp" else None  # every native rank is a data-parallel rank
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=pg)
        return t.tolist()

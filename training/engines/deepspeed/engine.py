"""The deepspeed engine: kmoe's model and AdamW under DeepSpeed ZeRO stage 1, 2 or 3, optional CPU offload.

kmoe's MoE runs as plain parameters (no expert parallelism: DeepSpeed's own MoE layer is refused under ZeRO-3
and routes top-1/2 only); under ZeRO-3 the MoE block is a leaf module (runtime.py). The trainer's lr schedule,
loss scaling and stability policy are kmoe's; DeepSpeed owns the gradient reduction, clipping and the step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ... import optim
from ...config import RunConfig, validate
from ...dims import ParallelDims, data_parallel_dims
from ...parallel import DistInfo
from ..base import Engine, Group, LossStats, MicroBatch, StepResult
from . import runtime, settings
from . import state as zstate
from .digests import zero_digests

log = logging.getLogger(__name__)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        validate(cfg, world_size=info.world)  # a layout this engine lacks is refused here, naming the key
        if cfg.train.precision == "bf16" and info.device.type != "cuda":
            raise ValueError("train.precision: bf16 needs a GPU; CPU runs train in fp32")
        self._dims = data_parallel_dims(info.rank, info.world)
        self._pending = False  # gradients of a train_batch not yet stepped or discarded

    @property
    def dims(self) -> ParallelDims:
        return self._dims

    @property
    def zero_stage(self) -> int:
        return self.cfg.engine.zero_stage

    def build(self, seed: int) -> None:
        ds = self.ds_lib = runtime.deepspeed_module()
        runtime.ensure_process_group(ds, self.info)
        on_gpu = self.info.device.type == "cuda"
        self.ds_config = settings.ds_config(self.cfg, self.info.world, on_gpu)
        self.model = runtime.build_model(ds, self.cfg, seed, self.ds_config)
        if self.zero_stage != 3:
            self.model.to(self.info.device)
        self.optimizer = optim.build_optimizer(self.model, self.cfg.train)
        self.ds, *_ = ds.initialize(model=self.model, optimizer=self.optimizer, config=self.ds_config,
                                    dist_init_required=False)  # fmt: skip
        self.ds.train()
        zstate.materialise_adam_state(self.optimizer, self.ds.optimizer)
        zstate.link_optimizer_state(self.ds.optimizer)
        if self.cfg.train.precision == "bf16":
            # DeepSpeed derives its fp32 masters from the bf16 weights; start them from the exact fp32 init.
            self.load_state_dict(self._init_state(seed))

    def _init_state(self, seed: int) -> dict[str, Any]:
        """model/init.py's fp32 value of every tensor, in the shape of a full state (no optimizer state)."""
        from model.init import init_value

        full = {}
        for name, p in self.model.named_parameters():
            shape = torch.Size(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty placeholder in p
            full[name] = init_value(name, shape, self.cfg.model, seed)
        for name, buf in zstate.persistent_buffer_items(self.model):
            full[name] = init_value(name, buf.shape, self.cfg.model, seed)
        return {"model": full, "optimizer": {"state": {}, "param_groups": []}}

    # ---- training ------------------------------------------------------------------------------
    def _loss_sum(self, tokens_BS, labels_BS, mask_BS):
        dev = self.info.device
        tokens_BS, labels_BS, mask_BS = tokens_BS.to(dev), labels_BS.to(dev), mask_BS.to(dev)
        out = self.ds(tokens_BS)
        ce_T = F.cross_entropy(out.logits.float().flatten(0, 1), labels_BS.flatten(), reduction="none")
        return (ce_T * mask_BS.flatten()).sum(), mask_BS.sum(), out.aux_loss

    def train_batch(self, micro_batches: list[MicroBatch]) -> LossStats:
        gas = self.ds.gradient_accumulation_steps()
        if len(micro_batches) != gas:
            raise ValueError(
                f"{len(micro_batches)} micro-batches on this rank, DeepSpeed was set up for {gas}"
            )
        total = LossStats(0.0, 0.0, 0.0)
        for micro in micro_batches:
            ce_sum, tokens, aux = self._loss_sum(micro.tokens_BS, micro.labels_BS, micro.loss_mask_BS)
            loss = ce_sum * micro.loss_scale
            if aux is not None:
                loss = loss + aux * micro.aux_scale
            self.ds.backward(loss, scale_wrt_gas=False)  # the trainer's loss_scale already averages
            if not micro.last:
                self.ds.step()  # off the accumulation boundary DeepSpeed only counts the micro-step
            total = total + LossStats(ce_sum.item(), tokens.item(), 0.0 if aux is None else aux.item())
        self._pending = True
        return total

    def _expert_load(self) -> torch.Tensor:
        loads = self.model.expert_load().to(torch.float64)
        dist.all_reduce(loads, group=self.dims.dp_group)
        return loads

    def step(self, lr: float) -> StepResult:
        loads = self._expert_load()
        optim.set_lr(self.optimizer, lr)  # ZeRO steps the flat partitions through this optimizer's groups
        self.ds.step()
        self._pending = False
        norm = float(self.ds.get_global_grad_norm())
        if not self.ds.was_step_applied():  # DeepSpeed skipped a non-finite gradient and dropped it
            self._zero_load()
            return StepResult(norm, False, loads.cpu())
        self.model.update_router_bias(loads)  # the same all-reduced load on every rank
        return StepResult(norm, True, loads.cpu())

    def discard(self) -> None:
        """DeepSpeed has no call that drops reduced gradients; its own path for a non-finite gradient does
        (skip the step, clear every partition and counter), so a non-finite gradient is what it is given."""
        if self._pending:
            nan = float("nan")
            p = next(p for p in self.model.parameters() if p.requires_grad)
            if self.zero_stage == 3:
                local = self.ds_lib.utils.safe_get_local_grad(p)
                self.ds_lib.utils.safe_set_local_grad(p, torch.full_like(local, nan))
            else:
                self.ds_lib.utils.safe_set_full_grad(p, torch.full(p.shape, nan, device=p.device))
            self.ds.step()
            self._pending = False
            assert not self.ds.was_step_applied(), "DeepSpeed applied a step with a non-finite gradient"
        self._zero_load()

    def _zero_load(self) -> None:
        for m in self.model.moe_layers():
            m.load_E.zero_()

    @torch.no_grad()
    def evaluate(self, tokens_BS, labels_BS, loss_mask_BS) -> LossStats:
        self.ds.eval()
        try:
            ce_sum, tokens, _ = self._loss_sum(tokens_BS, labels_BS, loss_mask_BS)
        finally:
            self.ds.train()
        return LossStats(float(ce_sum), float(tokens), 0.0)

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full tensors on every rank (gathered one tensor at a time): the trainer's sharded checkpoint writes
        each once (DCP deduplicates replicated tensors) and every rank loads them back whole, as ZeRO's
        `safe_set_full_*` calls take them. The DeepSpeed-format shards (checkpoint.py) avoid the full copy."""
        return zstate.gathered_state(self.ds_lib, self.model, self.optimizer, True)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        zstate.load_full_state(
            self.ds_lib, self.model, self.optimizer, state, partitioned=self.zero_stage == 3
        )
        self._zero_load()

    def param_digests(self) -> dict[str, str]:
        """Layout-independent digests, each rank hashing the ZeRO partition it owns (nothing is gathered)."""
        return zero_digests(self.ds_lib, self.model)

    def all_reduce(self, values: list[float], op: str = "sum", group: Group = "world") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        pg = self.dims.dp_group if group == "dp" else None  # every rank is a data-parallel rank
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=pg)
        return t.tolist()

"""`engine: megatron`: kmoe's model as a megatron-core GPTModel behind the trainer's engine contract.

megatron owns the model stage of this rank (tensor/sequence, expert and pipeline parallel), its DDP with the
distributed optimizer, and the pipeline schedule (`get_forward_backward_func`), which runs all micro-batches of
a step in `train_batch`. The trainer keeps the loop, data, schedule of learning rates, signals, checkpoints
and ledger. Losses are summed per token and divided by the tokens of the whole global batch (megatron's
`calculate_per_token_loss`), as the native engine's `loss_scale` does; the aux-loss-free router bias moves by
kmoe's rate from the expert load of the whole global batch, and a skipped step leaves it where it was.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from kmoe.configtree import ConfigError

from ...config import RunConfig, validate
from ...dims import ParallelDims
from ...parallel import DistInfo
from ..base import Engine, Group, LossStats, MicroBatch, StepResult
from . import runtime, spec, state


class MegatronEngine(Engine):
    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        validate(cfg, world_size=info.world)  # includes spec.check_run: refusals name the key
        self.layout_sizes = spec.Layout.from_parallel(cfg.parallel)
        self.device = runtime.megatron_device()
        if cfg.train.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("train.precision: bf16 needs a GPU; CPU runs train in fp32")
        runtime.ensure_process_group(self.device)
        runtime.init_parallel(self.layout_sizes, cfg.train.seed)
        self._dims = runtime.parallel_dims(info.world)
        self._load_LE: torch.Tensor | None = None
        self._bias_before: list[torch.Tensor] | None = None

    @property
    def dims(self) -> ParallelDims:
        return self._dims

    def build(self, seed: int) -> None:
        self.built = runtime.build(self.cfg, self.layout_sizes, seed, self.device)
        self.built.config.finalize_model_grads_func = self._finalize
        if self.cfg.train.activation_checkpointing:
            runtime.enable_recompute(self.built.config)
        self.routers = runtime.routers(self.built.model.module, self.cfg.model)
        self.built.model.train()

    # ------------------------------------------------------------------ training
    def _finalize(self, model, num_tokens=None, **kwargs) -> None:
        """megatron's gradient finalisation, after noting the step's expert load and the bias it updates."""
        from megatron.core.distributed import finalize_model_grads

        self._load_LE = runtime.global_expert_load(self.routers, self.cfg.model, self.device)
        self._bias_before = [r.expert_bias.detach().clone() for _, r in self.routers]
        finalize_model_grads(model, num_tokens, **kwargs)

    def _schedule(self, micro_batches: list[MicroBatch], forward_only: bool) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, s = micro_batches[0].tokens_BS.shape
        dev = self.device

        def forward_step(data, model):
            mb = next(data)
            tokens, labels = mb.tokens_BS.to(dev), mb.labels_BS.to(dev)
            mask = mb.loss_mask_BS.to(dev).float()
            pos = torch.arange(s, device=dev).expand(tokens.shape[0], s)
            out = model(tokens, pos, None, labels=labels)

            def loss_func(loss_BS):
                ce = (loss_BS.float() * mask).sum()
                n = mask.sum()
                return ce, n.to(torch.int), {"stats": torch.stack([ce.detach(), n]).double()}

            return out, loss_func

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.built.model],
            num_microbatches=len(micro_batches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=forward_only,
        )

    def train_batch(self, micro_batches: list[MicroBatch]) -> LossStats:
        self._zero()
        out = self._schedule(micro_batches, forward_only=False)
        return self._stats(out)

    def _stats(self, out: list[Any]) -> LossStats:
        if not out or not self.dims.holds_loss:
            return LossStats(0.0, 0.0, 0.0)
        total = torch.stack([o["stats"] for o in out]).sum(0).tolist()
        return LossStats(total[0], total[1], 0.0)

    def step(self, lr: float) -> StepResult:
        opt, t = self.built.optimizer, self.cfg.train
        for group in opt.param_groups:  # what megatron's OptimizerParamScheduler sets each step
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
        found_inf = opt.prepare_grads()
        norm = float(opt.get_grad_norm())
        loads = self._load_LE if self._load_LE is not None else runtime.no_load(self.cfg.model)
        if found_inf or not math.isfinite(norm):
            self.discard()
            return StepResult(norm, False, loads)
        runtime.clip(opt, t.grad_clip, norm)
        opt.step_with_ready_grads()
        self._bias_before, self._load_LE = None, None
        self._zero()
        return StepResult(norm, True, loads)

    def _zero(self) -> None:
        self.built.model.zero_grad_buffer()
        self.built.optimizer.zero_grad()

    def discard(self) -> None:
        self._zero()
        if self._bias_before is not None:  # finalize already moved the bias from this step's load
            with torch.no_grad():
                for (_, r), before in zip(self.routers, self._bias_before, strict=True):
                    r.expert_bias.copy_(before)
        for _, r in self.routers:
            r.local_tokens_per_expert.zero_()
        self._bias_before, self._load_LE = None, None

    @torch.no_grad()
    def evaluate(self, tokens_BS, labels_BS, loss_mask_BS) -> LossStats:
        micro = MicroBatch(tokens_BS, labels_BS, loss_mask_BS, 1.0, 1.0, True)
        self.built.model.eval()
        try:
            out = self._schedule([micro], forward_only=True)
        finally:
            self.built.model.train()
        return self._stats(out)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return state.full_state(self.cfg, self.built)

    def load_state_dict(self, full: dict[str, Any]) -> None:
        state.load_full_state(self.cfg, self.built, full)
        self.discard()

    def param_digests(self) -> dict[str, str]:
        return state.param_digests(self.cfg, self.built)

    def all_reduce(self, values: list[float], op: str = "sum", group: Group = "world") -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        pg = self.dims.dp_group if group == "dp" else None
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=pg)
        return t.tolist()

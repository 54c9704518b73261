"""kmoe's model and megatron-core's GPTModel compute the same thing (fp32, CPU, one gloo rank).

Both conversion directions give the same logits (max abs diff <= 1e-4), and megatron's aux-loss-free bias
step uses kmoe's `model.bias_update_rate` and lands where kmoe's own step lands.
"""

from __future__ import annotations

import pytest
import torch
from megatron_cpu import run_ranks

from model import ModelConfig, MoETransformer, init_weights
from model.checkpoint import model_state

TOL = 1e-4
RATE = 0.0037  # not megatron's default (1e-3): a rate that did not come from our config would show

CFG = dict(
    vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, first_k_dense=1,
    dense_intermediate_size=96, num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32,
    num_shared_experts=1, qk_norm=True, rotary_fraction=0.5, rope_theta=5000.0, bias_update_rate=RATE,
    balance_loss_coeff=0.0,  # megatron refuses kmoe's balance loss (docs/megatron.md)
)  # fmt: skip


def _ours(cfg: ModelConfig, seed: int) -> MoETransformer:
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)  # a trained model's bias changes the routing
    return model


def _megatron(cfg: ModelConfig):
    from training.engines.megatron import runtime, spec

    runtime.init_parallel(spec.Layout(), seed=7)
    tcfg = spec.transformer_config(cfg, spec.Layout(), use_te=False)
    return tcfg, spec.build_gpt_model(cfg, tcfg, use_te=False)


def _logits(meg, tokens_BS):
    pos = torch.arange(tokens_BS.shape[1]).expand_as(tokens_BS)
    return meg(tokens_BS, pos, None)


@torch.no_grad()
def _randomize(meg) -> None:
    gen = torch.Generator().manual_seed(3)
    for name, p in meg.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    for name, b in meg.named_buffers():
        if name.endswith("expert_bias"):
            b.copy_(0.05 * torch.randn(b.shape, generator=gen))


def _equivalence() -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from training.engines.megatron import convert

    cfg = ModelConfig(**CFG)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    out = {}
    # kmoe -> megatron
    ours = _ours(cfg, seed=11).eval()
    tcfg, meg = _megatron(cfg)
    meg.load_state_dict(convert.to_megatron(cfg, model_state(ours)), strict=False)
    meg.eval()
    with torch.no_grad():
        out["to_megatron"] = (ours(tokens).logits - _logits(meg, tokens)).abs().max().item()
    # megatron -> kmoe
    _randomize(meg)
    back = MoETransformer(cfg).eval()
    back.load_state_dict(convert.from_megatron(cfg, meg.state_dict()), strict=True)
    with torch.no_grad():
        out["from_megatron"] = (back(tokens).logits - _logits(meg, tokens)).abs().max().item()
    # one aux-loss-free bias step in both, from the same routing
    out["rate"] = tcfg.moe_router_bias_update_rate
    before = {k: v.clone() for k, v in meg.state_dict().items() if k.endswith("expert_bias")}
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(), meg)
    ddp.train()
    ddp.zero_grad_buffer()
    _logits(ddp, tokens).float().sum().backward()
    finalize_model_grads([ddp], num_tokens=torch.tensor(tokens.numel()))
    back.train()
    back(tokens).logits.sum().backward()
    back.update_router_bias()
    after = {k: v.clone() for k, v in meg.state_dict().items() if k.endswith("expert_bias")}
    ours_bias = convert.to_megatron(cfg, model_state(back))
    out["bias_step"] = [(after[k] - before[k]).abs().unique().tolist() for k in sorted(after)]
    out["bias_vs_native"] = max((after[k] - ours_bias[k]).abs().max().item() for k in after)
    return out


@pytest.mark.distributed
def test_same_weights_same_logits_both_directions_and_bias_rate_from_config():
    (res,) = run_ranks(_equivalence, 1)
    assert res["to_megatron"] <= TOL, res
    assert res["from_megatron"] <= TOL, res
    assert res["rate"] == RATE
    # every expert's bias moved by exactly the configured rate, to where kmoe's own update puts it
    assert all(abs(x - RATE) < 1e-8 for step in res["bias_step"] for x in step), res["bias_step"]
    assert res["bias_vs_native"] <= 1e-7, res

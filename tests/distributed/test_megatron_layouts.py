"""kmoe weights cut for 2 megatron ranks (TP=2 with sequence parallel, EP=2, PP=2) give kmoe's logits.

Each rank takes its slice of the converted full state (training/engines/megatron/shard.py): its half of the
heads / ffn / vocabulary, its experts under their global index, or its pipeline stage's layers.
"""

from __future__ import annotations

import pytest
import torch
from megatron_cpu import run_ranks

from model import ModelConfig, MoETransformer, init_weights
from model.checkpoint import model_state

CFG = dict(
    vocab_size=128, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, first_k_dense=1,
    dense_intermediate_size=96, num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32,
    qk_norm=True, rotary_fraction=0.5,
)  # fmt: skip
B, S = 2, 16


def _forward(tp: int, pp: int, ep: int):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from training.engines.megatron import convert, runtime, shard, spec

    runtime.init_parallel(spec.Layout(tp=tp, pp=pp, ep=ep), seed=7)
    cfg = ModelConfig(**CFG)
    ours = MoETransformer(cfg)
    init_weights(ours, cfg, seed=11)
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    tcfg = spec.transformer_config(cfg, spec.Layout(tp=tp, pp=pp, ep=ep), use_te=False)
    meg = spec.build_gpt_model(cfg, tcfg, use_te=False)
    full = convert.to_megatron(cfg, model_state(ours))
    missing, _ = meg.load_state_dict(
        shard.local_state_from_full(meg, full, shard.RankPlace.current(tcfg)), strict=False
    )
    assert all(k.endswith("_extra_state") for k in missing), missing
    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))

    def step(data, model):
        out = model(next(data), torch.arange(S).expand(B, S), None)
        return out, lambda o: (
            o.sum() * 0,
            torch.tensor(1),
            {"logits": gather_from_tensor_model_parallel_region(o)},
        )

    with torch.no_grad():
        res = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=[meg.eval()], num_microbatches=1,
            seq_length=S, micro_batch_size=B, forward_only=True,
        )  # fmt: skip
        if not res:  # not the last pipeline stage
            return None
        return (res[0]["logits"] - ours.eval()(tokens).logits).abs().max().item()


@pytest.mark.full
@pytest.mark.distributed
@pytest.mark.parametrize("tp, pp, ep", [(2, 1, 1), (1, 1, 2), (1, 2, 1)], ids=["tp2_sp", "ep2", "pp2"])
def test_two_rank_layouts_give_kmoe_logits(tp, pp, ep):
    diffs = run_ranks(_forward, 2, tp, pp, ep)
    last = [d for d in diffs if d is not None]
    assert last and max(last) <= 1e-4, diffs

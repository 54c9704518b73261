"""`train.activation_checkpointing` under the megatron engine (megatron's full-layer recompute): the same
losses, gradient norms and expert counts as without it. Recomputation must not count routed tokens twice,
or the router bias would move differently."""

from __future__ import annotations

from pathlib import Path

import pytest
from megatron_cpu import run_ranks

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs/train/toy.yaml")


def _steps(shards: str, checkpointing: bool) -> tuple[list[tuple[float, float, list]], int]:
    from multirank import rank_info

    from training.config import load_run_config
    from training.data import TrainData
    from training.engines import build_engine
    from training.trainer import global_loss, micro_batches

    over = [
        f"data.shards={shards}",
        "engine.name=megatron",
        "model.balance_loss_coeff=0",
        f"train.activation_checkpointing={checkpointing}",
    ]
    cfg = load_run_config(TOY, over)
    engine, data = build_engine(cfg, rank_info()), TrainData(cfg)
    engine.build(cfg.train.seed)
    calls = [0]
    mlp = engine.built.model.module.decoder.layers[-1].mlp  # the MoE layer
    mlp.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = []
    for i in range(3):
        batch = data.global_batch(i)
        loss, _ = global_loss(engine, engine.train_batch(micro_batches(batch, engine.dims, 4)))
        res = engine.step(cfg.train.lr)
        out.append((loss, res.grad_norm, res.expert_load_LE.tolist()))
    return out, calls[0]


@pytest.mark.full
def test_activation_checkpointing_changes_nothing(tmp_path):
    from toy_shards import write_toy_shards

    shards = str(write_toy_shards(tmp_path / "toy", n_docs=60))
    ((plain, plain_calls),) = run_ranks(_steps, 1, shards, False)
    ((recomputed, recomputed_calls),) = run_ranks(_steps, 1, shards, True)
    assert recomputed_calls == 2 * plain_calls  # the MoE layer did run again in the backward pass
    assert recomputed == plain

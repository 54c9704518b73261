"""megatron dist_checkpointing through the engine: saved at EP=2 by 2 ranks (each writing its shards), loaded
at EP=1 on one rank and at TP=2 on two: the same layout-independent digests, the same AdamW moments, and the
same next step."""

from __future__ import annotations

from pathlib import Path

import pytest
from megatron_cpu import run_ranks

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs/train/toy.yaml")


def _step(engine, data, index: int, cfg) -> float:
    from training.trainer import global_loss, micro_batches

    stats = engine.train_batch(
        micro_batches(data.global_batch(index), engine.dims, cfg.train.micro_batch_size)
    )
    loss, _ = global_loss(engine, stats)
    engine.step(cfg.train.lr)
    return loss / float(data.global_batch(index).loss_mask_GS.sum())


def _moments(engine) -> dict[str, list[float]] | None:
    import torch.distributed as dist

    state = engine.state_dict()["optimizer"]["state"]  # complete on rank 0
    if dist.get_rank():
        return None
    return {
        n: [s["exp_avg"].double().sum().item(), s["exp_avg_sq"].double().sum().item()]
        for n, s in state.items()
    }


def _run(shards: str, path: str, save: bool, *layout: str) -> dict:
    import torch.distributed as dist
    from multirank import rank_info

    from training.config import load_run_config
    from training.data import TrainData
    from training.engines import build_engine
    from training.engines.megatron import dist_ckpt

    over = [
        f"data.shards={shards}",
        "checkpoint.every=0",
        "train.eval_every=0",
        "engine.name=megatron",
        "model.balance_loss_coeff=0",
        *layout,
    ]
    cfg = load_run_config(TOY, over)
    engine, data = build_engine(cfg, rank_info()), TrainData(cfg)
    engine.build(cfg.train.seed if save else cfg.train.seed + 7)  # a loader starts from other weights
    if save:
        for i in range(3):
            _step(engine, data, i, cfg)
        Path(path).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_ckpt.save(engine.built, path)
    else:
        dist_ckpt.load(engine.built, path)
    return {
        "digests": engine.param_digests(),
        "moments": _moments(engine),
        "next": _step(engine, data, 3, cfg),
    }


@pytest.mark.full
@pytest.mark.distributed
def test_saved_at_ep2_loads_at_ep1_and_tp2(tmp_path):
    from toy_shards import write_toy_shards

    shards, ckpt = str(write_toy_shards(tmp_path / "toy", n_docs=80)), str(tmp_path / "ckpt")
    saved = run_ranks(_run, 2, shards, ckpt, True, "parallel.expert_parallel=2")
    assert len(list(Path(ckpt).glob("*.distcp"))) >= 2  # each rank wrote its own shard file
    for world, layout in [(1, ()), (2, ("parallel.tensor_parallel=2",))]:
        loaded = run_ranks(_run, world, shards, ckpt, False, *layout)
        assert loaded[0]["digests"] == saved[0]["digests"], layout
        assert loaded[0]["moments"].keys() == saved[0]["moments"].keys()
        for name, sums in saved[0]["moments"].items():
            assert loaded[0]["moments"][name] == pytest.approx(sums, rel=1e-6), name
        assert loaded[0]["next"] == pytest.approx(saved[0]["next"], rel=1e-4), layout

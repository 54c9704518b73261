"""Parallel sizes from a config (pure): what validate checks, the dry run prints and the engines report."""

import pytest

from kmoe.configtree import ConfigError
from training.config import load_run_config, validate
from training.dims import data_parallel_dims, layout, parallel_sizes

TOY = "configs/train/toy.yaml"


def cfg(*sets: str):
    return load_run_config(TOY, list(sets))


def test_expert_parallel_borrows_data_parallel_ranks():
    sz = parallel_sizes(cfg("parallel.expert_parallel=2", "train.micro_batch_size=2"), 4)
    assert (sz.world, sz.dp, sz.ep, sz.tp, sz.pp, sz.cp) == (4, 4, 2, 1, 1, 1)
    lay = layout(cfg("parallel.expert_parallel=2", "train.micro_batch_size=2"), 4)
    assert (lay["strategy"], lay["data_parallel"], lay["expert_parallel"], lay["grad_accumulation"]) == (
        "fsdp", 4, 2, 1)  # fmt: skip


@pytest.mark.parametrize(
    "sets,world,key",
    [
        (
            ["parallel.expert_parallel=4"],
            2,
            "parallel.expert_parallel: 4 must divide the data-parallel size 2",
        ),
        (["parallel.expert_parallel=2", "parallel.strategy=ddp"], 2, "parallel.strategy: 'ddp' with expert"),
        (["train.micro_batch_size=4"], 4, "train.global_batch_size: 8 is not divisible"),
    ],
)
def test_sizes_that_do_not_fit_name_the_key(sets, world, key):
    with pytest.raises(ConfigError, match=key):
        validate(cfg(*sets), world_size=world)


def test_data_parallel_dims_hold_the_loss_on_every_rank():
    d = data_parallel_dims(rank=3, world=4, ep=2)
    assert (d.dp_rank, d.dp_size, d.ep, d.holds_loss) == (3, 4, 2, True)
    assert d.sizes() == parallel_sizes(cfg("parallel.expert_parallel=2", "train.micro_batch_size=2"), 4)

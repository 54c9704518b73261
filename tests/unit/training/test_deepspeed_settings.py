"""The deepspeed engine's config mapping, its `engine.*` checks and its memory plan (pure: no deepspeed, no ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmoe.configtree import ConfigError
from training.config import load_run_config, validate
from training.dims import layout
from training.engines.deepspeed.memory import block_numels, param_shapes, zero_memory_plan
from training.engines.deepspeed.settings import ds_config

TINY = str(Path(__file__).resolve().parents[3] / "configs/train/tiny.yaml")


def cfg(*more: str):
    return load_run_config(TINY, ["engine.name=deepspeed", *more])


def test_config_maps_stage_offload_batching_and_clipping():
    c = ds_config(
        cfg("engine.zero_stage=3", "engine.offload_optimizer=cpu", "engine.offload_params=cpu"), 2, False
    )
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_optimization"]["offload_param"]["device"] == "cpu"
    # 16 sequences = 8 per micro-batch x 1 accumulation step x 2 ranks; the trainer's clip value
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (
        16,
        8,
        1,
    )
    assert c["gradient_clipping"] == 1.0 and "bf16" not in c and "scheduler" not in c
    assert not c["zero_optimization"]["overlap_comm"]  # no CUDA streams on CPU
    assert ds_config(cfg("train.micro_batch_size=2"), 2, False)["gradient_accumulation_steps"] == 4
    gpu = ds_config(cfg("train.precision=bf16", "launch.gpus_per_node=8", "launch.procs_per_node=0"), 8, True)
    assert gpu["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert gpu["zero_optimization"]["overlap_comm"]


@pytest.mark.parametrize(
    "overrides,key",
    [
        (("engine.zero_stage=0",), "engine.zero_stage"),
        (("engine.zero_stage=4",), "engine.zero_stage"),
        (("engine.zero_stage=2", "engine.offload_params=cpu"), "engine.offload_params"),
        (("parallel.strategy=fsdp",), "parallel.strategy"),
        (("parallel.expert_parallel=2",), "parallel.expert_parallel"),
        (("train.compile=true",), "train.compile"),
        (("train.activation_checkpointing=true",), "train.activation_checkpointing"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        cfg(*overrides)


@pytest.mark.parametrize(
    "key,value", [("zero_stage", 3), ("offload_optimizer", "cpu"), ("offload_params", "cpu")]
)
def test_deepspeed_settings_under_another_engine_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        load_run_config(TINY, [f"engine.{key}={value}"])


def test_layout_names_the_zero_stage_and_offload():
    c = cfg("engine.zero_stage=3", "engine.offload_optimizer=cpu")
    validate(c, world_size=2)
    lay = layout(c, 2)
    assert lay["strategy"] == "zero3" and lay["data_parallel"] == 2
    assert lay["offload"] == {"optimizer": "cpu", "params": "none"}


def test_memory_plan_shards_what_each_stage_shards():
    shapes = param_shapes(cfg())
    total = sum(shapes.values())
    z1, z2, z3 = (zero_memory_plan(cfg(f"engine.zero_stage={s}"), 4, shapes) for s in (1, 2, 3))
    assert z1.device["parameters (whole)"] == 4 * total
    assert z1.device["gradients (whole)"] == 4 * total  # fp32 gradients: 4 bytes per element
    assert z2.device["gradients (1/4 shards)"] == pytest.approx(4 * total / 4, rel=1e-3)
    assert z1.device["optimizer: fp32 master + AdamW moments (1/4)"] == pytest.approx(
        12 * total / 4, rel=1e-3
    )
    assert z3.device["parameters (1/4 shards)"] + z3.device["parameters kept whole (small)"] < 4 * total / 2
    # ZeRO-3 gathers a whole transformer block (attention and every expert) at once: the plan counts it
    leaf = max(block_numels(shapes).values())
    assert z3.device["gathered leaf block (attention + all experts)"] == 4 * leaf
    assert (
        leaf > 8 * 3 * 256 * 256
    )  # 8 experts x (gate, up, down) of 256 x 256, plus router and shared expert
    assert z1.device_total > z2.device_total


def test_offload_moves_optimizer_state_and_parameter_shards_to_host():
    shapes = param_shapes(cfg())
    on = zero_memory_plan(cfg("engine.zero_stage=3"), 2, shapes)
    off = zero_memory_plan(cfg("engine.zero_stage=3", "engine.offload_optimizer=cpu", "engine.offload_params=cpu"), 2, shapes)  # fmt: skip
    assert on.host_total == 0 and off.host_total > 0
    assert off.device_total < on.device_total
    assert "parameters (1/2 shards)" in off.host and "parameters (1/2 shards)" not in off.device
    assert (
        off.host["optimizer: fp32 master + AdamW moments"]
        == on.device["optimizer: fp32 master + AdamW moments (1/2)"]
    )

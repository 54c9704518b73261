"""The per-rank memory plan of `kmoe train --dry-run`: what it counts, that it shrinks as ranks are added,
and that a layout which cannot fit its GPUs is refused naming the key, before any compute."""

from pathlib import Path

import pytest

from kmoe.cli import main
from kmoe.configtree import ConfigError
from model.params import model_size
from training.config import load_run_config, validate
from training.memory_plan import GIB, memory_plan

CONFIGS = Path(__file__).resolve().parents[3] / "configs/train"


def test_state_is_sixteen_bytes_a_parameter_sharded_by_fsdp_and_whole_under_ddp():
    cfg = load_run_config(CONFIGS / "small.yaml")
    n = model_size(cfg.model).total
    fsdp = memory_plan(cfg, 8)
    assert fsdp.params + fsdp.grads + fsdp.optimizer == pytest.approx(16 * n / 8)
    assert fsdp.gathered > 0
    ddp = memory_plan(load_run_config(CONFIGS / "small.yaml", ["parallel.strategy=ddp"]), 8)
    assert ddp.params + ddp.grads + ddp.optimizer == pytest.approx(16 * n) and ddp.gathered == 0
    more = memory_plan(cfg, 16)
    assert more.total < fsdp.total and more.activations == fsdp.activations  # per micro-batch, not per rank


def test_activation_checkpointing_and_micro_batch_move_the_activations():
    base = load_run_config(CONFIGS / "small.yaml")
    ac = load_run_config(CONFIGS / "small.yaml", ["train.activation_checkpointing=true"])
    assert memory_plan(ac, 8).activations < memory_plan(base, 8).activations / 4
    big = load_run_config(CONFIGS / "small.yaml", ["train.micro_batch_size=4", "train.global_batch_size=64"])
    assert memory_plan(big, 8).activations == pytest.approx(2 * memory_plan(base, 8).activations)
    assert memory_plan(ac, 8).hw_flops_per_step == pytest.approx(memory_plan(ac, 8).flops_per_step * 4 / 3)


def test_small_dry_run_prints_the_plan(capsys):
    assert main(["train", "--config", str(CONFIGS / "small.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank (fsdp, 8 ranks, dp 8, ep 1)" in out and "fits" in out
    assert "FLOPs per step" in out and "optimizer m, v" in out


def test_a_layout_that_cannot_fit_is_refused_naming_the_key(capsys):
    cfg = load_run_config(CONFIGS / "small.yaml", ["launch.gpu_memory_gib=4"])
    with pytest.raises(ConfigError, match=r"launch\.gpu_memory_gib: 4.0 GiB per GPU cannot hold"):
        validate(cfg, world_size=8)
    code = main(
        ["train", "--config", str(CONFIGS / "small.yaml"), "--dry-run", "--set", "launch.gpu_memory_gib=4"]
    )
    assert code == 2 and "launch.gpu_memory_gib" in capsys.readouterr().err
    cpu = load_run_config(CONFIGS / "small.yaml", ["launch.gpu_memory_gib=4", "launch.gpus_per_node=0",
                                                   "launch.procs_per_node=4"])  # fmt: skip
    validate(cpu, world_size=4)  # CPU ranks: no GPU memory to hold it to


def test_solar100b_dry_run_fits_64_gpus_and_is_refused_on_16(capsys):
    config = str(CONFIGS / "solar100b.yaml")
    assert main(["train", "--config", config, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory plan per rank (fsdp, 64 ranks, dp 64, ep 8)" in out and ": fits," in out
    plan = memory_plan(load_run_config(config), 64)
    assert 30 * GIB < plan.total < plan.usable  # the state alone is 16 bytes x 102.6B / 64 = 25.7 GB
    assert main(["train", "--config", config, "--dry-run", "--set", "launch.nodes=2"]) == 2
    assert "launch.gpu_memory_gib" in capsys.readouterr().err

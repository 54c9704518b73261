"""Runs of kmoe's trainer on the toy config, in this process, for tests that need a real model or run directory.

There is one training loop (training/trainer.py); tests drive it through its public functions: `run`, or
`build` plus `replay_step` batch by batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kmoe import configtree

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = str(REPO / "configs/train/toy.yaml")


def tiny_model() -> list[str]:
    """`--set` overrides that give the toy run config configs/model/tiny.yaml's model."""
    return [f"model.{k}={v}" for k, v in configtree.read_yaml(REPO / "configs/model/tiny.yaml").items()]


def toy_config(shards: str | Path, *overrides: str):
    from training.config import load_run_config

    base = [f"data.shards={shards}", "log.wandb=false", "train.eval_every=0"]
    return load_run_config(TOY_CONFIG, base + list(overrides))


def one_process():
    from training.parallel import DistInfo

    return DistInfo(0, 1, 0, torch.device("cpu"))


def built_trainer(cfg, run_dir: str | Path | None = None):
    """A trainer with data, engine (initialised from the seed) and optimizer that writes nothing: drive it with
    `replay_step(trainer.data.global_batch(i))`."""
    import tempfile

    from training.trainer import Trainer

    trainer = Trainer(cfg, Path(run_dir or tempfile.mkdtemp(prefix="kmoe-unwritten-")), one_process())
    trainer.build(write_metrics=False)
    return trainer

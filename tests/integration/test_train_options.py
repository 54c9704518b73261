"""Options that change how, not what, the model computes: activation checkpointing and torch.compile
give the same losses as the plain run, and so does gradient accumulation over smaller micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from toy_shards import write_toy_shards

from training.config import load_run_config
from training.parallel import DistInfo
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=80)


def losses(shards: Path, run_dir: Path, *extra: str) -> list[float]:
    cfg = load_run_config(CONFIG, [f"data.shards={shards}", "train.steps=4", "train.eval_every=0",
                                   "checkpoint.every=0", *extra])  # fmt: skip
    tr = Trainer(cfg, run_dir, DistInfo(0, 1, 0, torch.device("cpu")))
    assert tr.run() == 0
    rows = [__import__("json").loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def plain(shards, tmp_path_factory) -> list[float]:
    return losses(shards, tmp_path_factory.mktemp("plain"))


def test_activation_checkpointing_same_losses(shards, plain, tmp_path):
    assert losses(shards, tmp_path, "train.activation_checkpointing=true") == pytest.approx(plain, abs=1e-6)


def test_gradient_accumulation_same_losses(shards, plain, tmp_path):
    # micro-batch 2 instead of 4: four accumulated micro-batches per step, same global batch
    assert losses(shards, tmp_path, "train.micro_batch_size=2") == pytest.approx(plain, abs=1e-5)


@pytest.mark.full
def test_torch_compile_same_losses(shards, plain, tmp_path):
    assert losses(shards, tmp_path, "train.compile=true") == pytest.approx(plain, abs=1e-4)

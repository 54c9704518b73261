"""Run a function on N gloo ranks in fresh processes (OLMo-core's run_distributed_test, on a FileStore:
no port to pick, so concurrent test runs on one machine cannot collide)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world: int, store: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, tmp: Path, *args: Any) -> None:
    """`fn(rank, world, *args)` on `world` ranks; raises if any rank fails."""
    store = tmp / f"store-{os.getpid()}-{id(fn)}"
    mp.start_processes(_entry, args=(fn, world, str(store), args), nprocs=world, start_method="spawn")

"""In-process multi-rank tests on CPU: `run_distributed_test(fn, world_size=2)` runs `fn(*args)` on that many
gloo ranks (spawned processes, one thread each) and returns each rank's return value, as OLMo-core's helper
of the same name does. Beside the torchrun subprocess tests, for code that needs ranks but not a launcher.

`fn` must be importable by name (a module-level function of a test module or helper); ranks meet through a
FileStore in a temporary directory, so no port is chosen (gloo's own connections take free ports).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(
    rank: int,
    fn: Callable,
    world: int,
    backend: str,
    store: str,
    out: str,
    args: tuple,
    setup: Callable | None,
) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if setup is not None:
        setup()
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(*args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed_test(
    fn: Callable[..., Any],
    world_size: int = 2,
    backend: str = "gloo",
    args: tuple = (),
    setup: Callable[[], None] | None = None,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` ranks of a fresh process group; the list of their return values.

    `setup` (importable, no arguments) runs first in each rank, e.g. tests/megatron_cpu.py's `install`.
    A rank that raises fails the call with that rank's traceback."""
    with tempfile.TemporaryDirectory(prefix="kmoe-ranks-") as tmp:
        store = str(Path(tmp) / "store")
        mp.start_processes(
            _rank_main,
            args=(fn, world_size, backend, store, tmp, args, setup),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def rank_info():
    """The `DistInfo` of this rank inside `run_distributed_test`."""
    from training.parallel import DistInfo

    rank = dist.get_rank()
    return DistInfo(rank, dist.get_world_size(), rank, torch.device("cpu"))

"""What `kmoe train` checks before it writes anything, and one verdict for every rank.

`training.config.validate` has checked the config (what the engine implements included) before the process
group exists; here come the checks that need the machine: the data, the device the precision needs, the
checkpoint to resume from, and the signing key of a run that continues. `agreed` runs such a check on every
rank and gives every rank the same outcome, so a refusal is the same one line on every rank and no rank is
left in a collective waiting for a peer that has exited (gloo's "Connection closed by peer").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from kmoe.configtree import ConfigError

from .config import RunConfig
from .data import check_sources
from .ledger_keys import check_run_key
from .parallel import DistInfo

T = TypeVar("T")


def check_run(
    cfg: RunConfig,
    info: DistInfo,
    run_dir: Path,
    resume: str | None,
    key_path: str | None = None,
    key_dir: str | None = None,
) -> None:
    """Raise ValueError for what would otherwise fail after the run directory, its config or key exist."""
    check_sources(cfg)
    if cfg.train.precision == "bf16" and info.device.type != "cuda":
        raise ConfigError("train.precision: bf16 needs a GPU; CPU runs train in fp32")
    if resume not in (None, "none", "auto") and not Path(resume).is_dir():
        raise ValueError(f"--resume: {resume} is not a checkpoint directory")
    if info.is_main:  # rank 0 signs: the key of a run that continues must be found before anything is written
        check_run_key(run_dir, key_path, key_dir)


def agreed(info: DistInfo, fn: Callable[[], T]) -> T:
    """`fn()` on every rank; when it raises a user error (ValueError) on any rank, every rank raises it."""
    error: str | None = None
    result = None
    try:
        result = fn()
    except ValueError as e:
        error = str(e)
    errors = [error]
    if info.initialized:
        errors = [None] * info.world
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        rank, message = failed[0]
        same = all(e == message for _, e in failed) and len(failed) == len(errors)
        raise ValueError(message if same or len(errors) == 1 else f"rank {rank}: {message}")
    return result  # type: ignore[return-value]

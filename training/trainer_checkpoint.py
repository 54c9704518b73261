"""The trainer's checkpoint cadence: sharded saves (optionally async) and verified loads (Trainer mixin).

Every rank hands its own shards to training/checkpoint.py; rank 0 adds the small files, renames the
directory into place, records it in the ledger with the file hashes the writers computed (nothing is hashed
again) and prunes old ones. With `checkpoint.async_save`, interval checkpoints are written by a background
thread over a dedicated gloo group while training goes on; the ledger records such a checkpoint when it is
complete (`written_async`, possibly a few steps later), and the next checkpoint, a rollback, a stop signal
or the end of the run waits for it first. Final and signal checkpoints are always synchronous.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import torch.distributed as dist

from . import checkpoint as ckpt
from .config import config_dict, config_hash
from .parallel import barrier

log = logging.getLogger(__name__)


class CheckpointingMixin:
    """Needs from the Trainer: cfg, info, engine, state, ckpt_root, ledger, metrics, _rel, TrainerState."""

    _pending: ckpt.PendingSave | None = None
    _async_group: Any = None

    def load_checkpoint_state(self, path) -> dict[str, Any]:
        """Model, optimizer (router bias included), data position, spike window and RNG from a verified
        checkpoint; records nothing. Resume, rollback and `kmoe audit replay` all load through here. Each
        rank reads only the blocks its own layout needs, whatever layout wrote them."""
        manifest = ckpt.read_manifest(path)
        if manifest["format"] == ckpt.FORMAT:
            flat = ckpt.flatten_state(self.engine.state_dict())  # this rank's shards, filled in place
            root = ckpt.load_into(path, manifest, flat)  # every tensor's digest checked after loading
            loaded = ckpt.load_host(path, manifest) | {"merkle_root": root}  # root of what was loaded
            self.engine.load_state_dict(ckpt.unflatten_state(flat, loaded["param_groups"]))
        else:  # format 1: the full state, verified, on every rank
            loaded = ckpt.load_legacy(path, manifest)
            self.engine.load_state_dict(
                {"model": loaded["model"], "optimizer": loaded["optimizer"]}, full=True
            )
        ts = loaded["trainer_state"]
        self.state = self.TrainerState(**ts["trainer"])
        host = ts["host_rng"].get(f"rank{self.info.rank}", ts["host_rng"]["rank0"])
        ckpt.restore_rng(ckpt.rank_rng(loaded["rng"], self.info.rank), host)
        return loaded

    def _checkpoint_unless_written(self, reason: str) -> None:
        """Checkpoint this step unless its interval checkpoint (or the one resumed from) already exists: the
        ledger recorded that one's files, so writing the step again would break them."""
        self._finish_pending()
        if not ckpt.step_dir(self.ckpt_root, self.state.step).is_dir():
            self._checkpoint(reason=reason)

    def _checkpoint(self, reason: str) -> None:
        self._finish_pending()
        state = self.engine.state_dict()  # this rank's shards: nothing is gathered
        rng_t, rng_host = ckpt.rng_state()
        gathered: list[Any] | None = [(rng_t, rng_host)]
        if self.info.initialized:
            gathered = [None] * self.info.world if self.info.is_main else None
            dist.gather_object((rng_t, rng_host), gathered, dst=0)
        host = None
        if self.info.is_main:
            assert gathered is not None
            trainer_state = {"trainer": asdict(self.state), "host_rng": {f"rank{r}": g[1] for r, g in enumerate(gathered)},
                             "config_hash": config_hash(self.cfg), "world_size": self.info.world,
                             "layout": self.engine.layout(), "reason": reason, "time": time.time()}  # fmt: skip
            rng = {f"rank{r}": g[0] for r, g in enumerate(gathered)}
            host = ckpt.HostState(
                config_dict(self.cfg), trainer_state, rng, state["optimizer"]["param_groups"]
            )
        asynchronous = self.cfg.checkpoint.async_save and reason == "interval"
        group = self._checkpoint_group() if asynchronous else None
        self._pending = ckpt.begin_save(self.ckpt_root, self.state.step, ckpt.flatten_state(state), host, group,
                                        asynchronous)  # fmt: skip
        if not asynchronous:
            self._finish_pending()

    def _checkpoint_group(self) -> Any:
        """A gloo group of all ranks for the background writer, apart from the training collectives."""
        if self._async_group is None and self.info.initialized:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _poll_checkpoint(self) -> None:
        """Record an async checkpoint whose shards are all written (no collective: rank 0 alone decides)."""
        if self._pending is not None and self._pending.done():
            self._finish_pending(wait_for_all=False)

    def _finish_pending(self, wait_for_all: bool = True) -> None:
        """Complete the checkpoint being written: rank 0 renames it into place, records it and prunes."""
        p, self._pending = self._pending, None
        if p is not None:
            rec = ckpt.finish_save(p)
            if rec is not None:
                self._record_checkpoint(p, rec)
        if wait_for_all:
            barrier(self.info)

    def _record_checkpoint(self, p: ckpt.PendingSave, rec: dict[str, Any]) -> None:
        assert p.host is not None
        reason = p.host.trainer_state["reason"]
        log.info("checkpoint %s (%s)", rec["path"], reason)
        self.metrics.event(
            "checkpoint", step=p.step, path=str(rec["path"]), reason=reason, roots=rec["roots"]
        )
        extra = {"written_async": True} if rec["written_async"] else {}
        self.ledger.checkpoint(p.step, rec["path"], tokens=p.host.trainer_state["trainer"]["tokens"], roots=rec["roots"],
                               files=rec["files"], digest_scheme=rec["digest_scheme"], **extra)  # fmt: skip
        self.metrics.summary(self.ledger.identity())  # the signed head: survives a later crash
        for gone in ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every):
            self.ledger.event("checkpoint_deleted", path=self._rel(gone), reason="retention")

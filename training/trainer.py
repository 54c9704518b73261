"""The training loop, shared by every engine: data position, schedule, stability, signals, checkpoints.

Per step: take the next global batch, forward/backward this rank's micro-batches, decide (non-finite loss,
loss spike, gradient), optimizer step at the scheduled lr, record. A step counts even when skipped; a
spike rollback restores the last checkpoint and marks the offending batch as never to be trained on.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from kmoe.hashing import LEGACY_SCHEME, named_merkle_root, state_digests
from model.params import model_size

from . import checkpoint as ckpt
from . import evaluation, stability
from .config import RunConfig, config_dict, config_hash
from .data import GlobalBatch, TrainData, lang_counts, rank_slice
from .engines import Engine, LossStats, MicroBatch, ParallelDims, build_engine
from .hooks import LedgerHook, NullLedger
from .metrics import MetricsLogger
from .parallel import DistInfo, barrier
from .schedule import lr_at
from .signals import REQUEUE_EXIT_CODE, REQUEUE_MARKER, StopRequest

log = logging.getLogger(__name__)
TRAINER = "kmoe-train"  # the genesis record's `trainer`: `kmoe audit replay` picks its engine by it


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped steps included)
    tokens: int = 0  # tokens of the applied steps (what the ledger counts)
    batch_cursor: int = 0  # next batch of the train stream
    skipped_batches: list[int] = field(default_factory=list)  # never trained on (spike rollbacks)
    loss_window: list[float] = field(default_factory=list)  # recent good losses (spike detection)


@dataclass
class StepOutcome:
    loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    skip_reason: str | None
    load_LE: torch.Tensor | None


def micro_batches(batch: GlobalBatch, dims: ParallelDims, micro_batch_size: int) -> list[MicroBatch]:
    """This data-parallel rank's slice of `batch` in micro-batches; the loss is scaled so that the gradients,
    averaged over the data-parallel ranks, are those of the global batch's mean token loss."""
    sl = rank_slice(batch, dims.dp_rank, dims.dp_size)
    tokens, labels, mask = batch.tokens_GS[sl], batch.labels_GS[sl], batch.loss_mask_GS[sl]
    total, mb = float(batch.loss_mask_GS.sum()), micro_batch_size
    n = tokens.shape[0] // mb
    return [
        MicroBatch(tokens[i * mb:(i + 1) * mb], labels[i * mb:(i + 1) * mb], mask[i * mb:(i + 1) * mb],
                   loss_scale=dims.dp_size / max(total, 1.0), aux_scale=1.0 / n, last=i == n - 1)
        for i in range(n)
    ]  # fmt: skip


def global_loss(engine: Engine, stats: LossStats) -> tuple[float, float]:
    """(summed token loss, summed aux loss) of the global batch on every rank: one all-reduce over the world
    where only the ranks holding the loss contribute theirs (rank 0, the ledger's writer, may sit on the
    first pipeline stage), and each rank its aux loss as the engine counts it."""
    loss_sum = stats.loss_sum if engine.dims.holds_loss else 0.0
    loss_sum, aux = engine.all_reduce([loss_sum, stats.aux_loss], group="world")
    return loss_sum, aux


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, info: DistInfo, ledger: LedgerHook | None = None):
        self.cfg, self.run_dir, self.info = cfg, Path(run_dir), info
        self.ledger: LedgerHook = ledger if (ledger is not None and info.is_main) else NullLedger()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.state = TrainerState()
        self.stop = StopRequest()

    # ---- setup -------------------------------------------------------------------------------
    def setup(self, resume: str | None) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            ckpt.remove_partial(self.ckpt_root)
            if resume == "auto":
                self._set_aside_unrecorded()
            (self.run_dir / REQUEUE_MARKER).unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        barrier(self.info)
        self.build()
        path = self._resume_path(resume)
        if path is not None:
            self._restore(path, "resume")
            return
        data = self.data.describe()
        if self.ledger.has_genesis():  # restarted before any checkpoint: the ledger goes on, from init again
            digests = self._init_digests()
            self.ledger.event(
                "restart", step=0, model_root=named_merkle_root(digests), reason="no checkpoint"
            )
            self.metrics.event("restart", step=0, data=data)
            return
        self.ledger.genesis(config=config_dict(cfg), seed=cfg.train.seed, init_state=self.engine.param_digests(),
                            data_manifest_root=data["root_hash"], tokenizer_hash=data["tokenizer"],
                            world_size=self.info.world, trainer=TRAINER)  # fmt: skip
        self.metrics.event("start", config_hash=config_hash(cfg), layout=self.engine.layout(), data=data)

    def _init_digests(self) -> dict[str, str]:
        """The weights' digests under the genesis record's scheme. Collective (only rank 0 has the ledger)."""
        legacy = self.ledger.has_genesis() and self.ledger.init_scheme() == LEGACY_SCHEME
        if self.engine.all_reduce([float(legacy)], op="max")[0] == 0:
            return self.engine.param_digests()
        # a run begun before the Merkle scheme restarts: its genesis holds whole-tensor sha256 digests
        from torch.distributed.tensor import DTensor

        full = {
            k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in self.engine.state_dict()["model"].items()
        }
        return state_digests(full, LEGACY_SCHEME)

    def build(self, write_metrics: bool = True) -> None:
        """Data, engine (model initialised from the seed, optimizer) and the metrics logger; writes no file
        when `write_metrics` is False (replay)."""
        cfg = self.cfg
        self.data = TrainData(cfg)
        self.engine: Engine = build_engine(cfg, self.info)
        self.engine.build(cfg.train.seed)
        flops = model_size(cfg.model, cfg.data.seq_len).flops_train_per_token
        on = self.info.is_main and write_metrics
        self.metrics = MetricsLogger(self.run_dir, cfg, on, flops, self.info.world)

    def _set_aside_unrecorded(self) -> None:
        """A complete checkpoint the ledger never recorded (the process died between writing and recording
        it) is renamed `.unrecorded-step-*`, recorded as such, and not resumed from: the ledger vouches for
        every state a run continues from."""
        recorded = self.ledger.recorded_checkpoints()
        if recorded is None:
            return
        for step, path in ckpt.complete_checkpoints(self.ckpt_root):
            if self._rel(path) in recorded:
                continue
            aside = path.with_name(f".unrecorded-{path.name}-{int(time.time())}")
            path.rename(aside)
            log.warning("%s was written but never recorded in the ledger; set aside as %s", path, aside)
            root = json.loads((aside / "digests.json").read_text()).get("merkle_root")
            self.ledger.event("checkpoint_unrecorded", step=step, path=self._rel(path), moved_to=self._rel(aside),
                              model_root=root)  # fmt: skip

    def _resume_path(self, resume: str | None) -> Path | None:
        if not resume or resume == "none":
            return None
        if resume == "auto":
            return ckpt.latest(self.ckpt_root)
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"--resume: {path} is not a checkpoint directory")
        return path

    def _rel(self, path: Path) -> str:
        """A path as the ledger records it: relative to the run directory when inside it."""
        p, root = Path(path).resolve(), self.run_dir.resolve()
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    def load_checkpoint_state(self, path: Path) -> dict[str, Any]:
        """Model, optimizer (router bias included), data position, spike window and RNG from a verified
        checkpoint; records nothing. Resume, rollback and `kmoe audit replay` all load through here."""
        loaded = ckpt.load(path)  # verifies every tensor and file before anything is used
        self.engine.load_state_dict({"model": loaded["model"], "optimizer": loaded["optimizer"]})
        ts = loaded["trainer_state"]
        self.state = TrainerState(**ts["trainer"])
        host = ts["host_rng"].get(f"rank{self.info.rank}", ts["host_rng"]["rank0"])
        ckpt.restore_rng(ckpt.rank_rng(loaded["rng"], self.info.rank), host)
        return loaded

    def _restore(self, path: Path, why: str, **fields: Any) -> None:
        loaded = self.load_checkpoint_state(path)
        ts = loaded["trainer_state"]
        if ts.get("config_hash") != config_hash(self.cfg):
            log.warning("%s: the run config differs from the checkpoint's (config hash changed)", path)
        log.info("%s from %s (step %d)", why, path, self.state.step)
        root = loaded["merkle_root"]
        self.metrics.event(why, step=self.state.step, path=str(path), model_root=root, **fields)
        self.ledger.event(why, checkpoint=self._rel(path), step=self.state.step, model_root=root,
                          config_hash=config_hash(self.cfg), checkpoint_config_hash=ts.get("config_hash"),
                          **fields)  # fmt: skip
        self.ledger.weights_load(path, root, purpose=why)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, resume: str | None = None) -> int:
        """Set up (fresh or resumed) and train to `train.steps`; 0 when done, REQUEUE_EXIT_CODE on a signal."""
        self.setup(resume)
        return self.loop()

    def loop(self) -> int:
        """The step loop of a set-up trainer."""
        self.stop.install()
        try:
            while self.state.step < self.cfg.train.steps:
                if self._stop_agreed():
                    return self._stop_for_requeue()
                self._one_step()
            self._checkpoint_unless_written(reason="final")
            self.ledger.close("completed")
            self.metrics.summary(self.ledger.identity())
            return 0
        finally:
            self.stop.uninstall()
            self.metrics.close()

    def _stop_agreed(self) -> bool:
        flag = 1.0 if self.stop.requested else 0.0
        return self.engine.all_reduce([flag], op="max", group="world")[0] > 0  # every rank stops together

    def _stop_for_requeue(self) -> int:
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "peer rank"
        self.metrics.event("signal", step=self.state.step, signal=name)
        self.ledger.event("signal", step=self.state.step, signal=name, action="checkpoint and requeue")
        self._checkpoint_unless_written(reason="signal")
        self.ledger.close("requeue")
        self.metrics.summary(self.ledger.identity())
        if self.info.is_main:  # torchrun turns a worker's exit 75 into its own 1: launchers read this file
            marker = {"step": self.state.step, "signal": name, "exit_code": REQUEUE_EXIT_CODE}
            (self.run_dir / REQUEUE_MARKER).write_text(json.dumps(marker) + "\n")
        return REQUEUE_EXIT_CODE

    def _next_batch(self) -> GlobalBatch:
        skipped = set(self.state.skipped_batches)
        while self.state.batch_cursor in skipped:
            self.state.batch_cursor += 1
        batch = self.data.global_batch(self.state.batch_cursor)
        self.state.batch_cursor += 1
        return batch

    def _one_step(self) -> None:
        t0 = time.perf_counter()
        if self.apply_batch(self._next_batch(), t0) is not None:  # None: rolled back to a checkpoint
            self._after_step()

    def apply_batch(self, batch: GlobalBatch, t0: float | None = None) -> StepOutcome | None:
        """Train on `batch` as the next step and record it (metrics, ledger); None when it was rolled back.
        The one step function: training calls it on the next batch, `kmoe audit replay` on a recorded one."""
        t0 = time.perf_counter() if t0 is None else t0
        out = self._train_step(batch)
        if out is None:  # rolled back: the state is the checkpoint's now
            return None
        self.state.step += 1
        step, skipped = self.state.step, out.skip_reason is not None
        if not skipped:
            self.state.tokens += int(batch.tokens_GS.numel())
        row = {"step": step, "loss": out.loss, "aux_loss": out.aux_loss, "lr": out.lr, "grad_norm": out.grad_norm,
               "skipped": skipped, "skip_reason": out.skip_reason, "batch": batch.index,
               "batch_sha256": batch.sha256, "tokens": self.state.tokens, "step_time": time.perf_counter() - t0}  # fmt: skip
        alarms = self.metrics.step(row, int(batch.tokens_GS.numel()), out.load_LE)
        identity = {"sample_indices": batch.sample_indices, "batch_hash": batch.sha256, "batch": batch.index}
        if skipped:
            self.ledger.event("skip_step", step=step, reason=out.skip_reason, loss=out.loss,
                              grad_norm=out.grad_norm, **identity)  # fmt: skip
        else:
            self.ledger.step(step, tokens=self.state.tokens, loss=out.loss, grad_norm=out.grad_norm, lr=out.lr,
                             lang_tokens={k: v * self.cfg.data.seq_len for k, v in lang_counts(batch.langs).items()},
                             expert_load=out.load_LE, aux_loss=out.aux_loss, **identity)  # fmt: skip
        for alarm in alarms:
            self.ledger.event("expert_dead", step=step, **alarm)
        return out

    def _after_step(self) -> None:
        t, s = self.cfg.train, self.state.step
        if t.eval_every > 0 and (s % t.eval_every == 0 or s == t.steps):
            results = evaluation.evaluate(self.engine, self.data)
            if results:
                log.info("eval step %d: %s", s, evaluation.summary(results))
                self.metrics.event("eval", step=s, results=results)
                self.ledger.event("eval", step=s, results=results)
        every = self.cfg.checkpoint.every
        if every > 0 and s % every == 0:
            self._checkpoint(reason="interval")

    def _train_step(self, batch: GlobalBatch) -> StepOutcome | None:
        t = self.cfg.train
        micros = micro_batches(batch, self.engine.dims, t.micro_batch_size)
        loss_sum, aux_sum = global_loss(self.engine, self.engine.train_batch(micros))
        loss = loss_sum / max(float(batch.loss_mask_GS.sum()), 1.0)
        aux = aux_sum / (len(micros) * self.engine.dims.dp_size)
        lr = lr_at(self.state.step, t.schedule, t.steps, t.warmup_steps, t.lr, t.min_lr, t.decay_fraction)
        reason = None
        if not stability.is_finite(loss):
            reason = "nonfinite_loss"
        elif stability.is_spike(loss, self.state.loss_window, t.spike_threshold):
            reason = "spike"
            if t.spike_policy == "rollback" and self._rollback(batch, loss):
                return None
        if reason is not None:
            self.engine.discard()
            self._log_skip(reason, loss)
            return StepOutcome(loss, aux, lr, float("nan"), reason, None)
        res = self.engine.step(lr)
        if not res.applied:
            self._log_skip("nonfinite_grad", loss, res.grad_norm)
            return StepOutcome(loss, aux, lr, res.grad_norm, "nonfinite_grad", res.expert_load_LE)
        self.state.loss_window = stability.push(self.state.loss_window, loss)
        return StepOutcome(loss, aux, lr, res.grad_norm, None, res.expert_load_LE)

    def _log_skip(self, reason: str, loss: float, grad_norm: float | None = None) -> None:
        log.warning(
            "step %d skipped (%s): loss %s grad norm %s", self.state.step + 1, reason, loss, grad_norm
        )

    def _rollback(self, batch: GlobalBatch, loss: float) -> bool:
        """Restore the last checkpoint and never train on `batch`; False when there is no checkpoint."""
        path = ckpt.latest(self.ckpt_root)
        if path is None:
            log.warning("loss spike at batch %d but no checkpoint to roll back to; skipping it", batch.index)
            return False
        self.engine.discard()
        skipped = set(self.state.skipped_batches) | {batch.index}
        self._restore(path, "rollback", spike_step=self.state.step + 1, spike_loss=loss, skipped_batch=batch.index,
                      skipped_batch_hash=batch.sha256)  # fmt: skip
        self.state.skipped_batches = sorted(set(self.state.skipped_batches) | skipped)
        return True

    # ---- checkpoints -------------------------------------------------------------------------
    def _checkpoint_unless_written(self, reason: str) -> None:
        """Checkpoint this step unless its interval checkpoint (or the one resumed from) already exists: the
        ledger recorded that one's files, so writing the step again would break them."""
        if not ckpt.step_dir(self.ckpt_root, self.state.step).is_dir():
            self._checkpoint(reason=reason)

    def _checkpoint(self, reason: str) -> None:
        state = self.engine.state_dict()  # collective: every rank takes part
        rng_t, rng_host = ckpt.rng_state()
        gathered: list[Any] = [(rng_t, rng_host)]
        if self.info.initialized:
            gathered = [None] * self.info.world
            dist.all_gather_object(gathered, (rng_t, rng_host))
        if self.info.is_main:
            trainer_state = {
                "trainer": asdict(self.state),
                "host_rng": {f"rank{r}": g[1] for r, g in enumerate(gathered)},
                "config_hash": config_hash(self.cfg),
                "world_size": self.info.world,
                "layout": self.engine.layout(),
                "reason": reason,
                "time": time.time(),
            }
            rng = {f"rank{r}": g[0] for r, g in enumerate(gathered)}
            rec = ckpt.save(self.ckpt_root, self.state.step, state, config_dict(self.cfg), trainer_state, rng)
            log.info("checkpoint %s (%s)", rec["path"], reason)
            self.metrics.event("checkpoint", step=self.state.step, path=str(rec["path"]), reason=reason,
                               roots=rec["roots"])  # fmt: skip
            self.ledger.checkpoint(self.state.step, rec["path"], tokens=self.state.tokens, roots=rec["roots"],
                                   digest_scheme=rec["digest_scheme"])  # fmt: skip
            self.metrics.summary(self.ledger.identity())  # the signed head: survives a later crash
            for gone in ckpt.prune(
                self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every
            ):
                self.ledger.event("checkpoint_deleted", path=self._rel(gone), reason="retention")
        barrier(self.info)

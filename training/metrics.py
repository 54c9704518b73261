"""Metrics: one JSON line per step in metrics.jsonl, a console line every N steps, wandb (offline default).

Expert balance comes from the all-reduced per-step expert load, summed over the logging interval and
summarised per MoE layer with model.router.load_stats; an expert with no tokens over a whole interval
raises an alarm (log warning + returned so the trainer can record it in the ledger).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from kmoe.hashing import sha256_bytes
from model.router import load_stats

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per GPU (vendor datasheets); MFU is reported only when the device is known.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(configured: float) -> float:
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return 0.0


def expert_balance(load_LE: torch.Tensor) -> dict[str, Any]:
    """Per-layer load statistics and the worst values over layers."""
    layers = [load_stats(row) for row in load_LE]
    if not layers:
        return {}
    return {
        "layers": layers,
        "max_cv": max(s["cv"] for s in layers),
        "max_share": max(s["max_share"] for s in layers),
        "min_share": min(s["min_share"] for s in layers),
        "dead_frac": max(s["dead_frac"] for s in layers),
    }


def dead_experts(load_LE: torch.Tensor) -> list[dict[str, Any]]:
    return [
        {"moe_layer": i, "experts": (row == 0).nonzero().flatten().tolist()}
        for i, row in enumerate(load_LE)
        if bool((row == 0).any())
    ]


def balance_summary(path: Path, every: int) -> str:
    """One line on expert balance over a whole run from its metrics.jsonl (a step logged again after a resume
    counts once, its last line): the last interval's load CV and the intervals with an expert without tokens."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "expert_max_cv" in row and "event" not in row:
                rows[row["step"]] = row
    if not rows:
        return ""
    last = rows[max(rows)]
    collapsed = [s for s in sorted(rows) if rows[s]["expert_dead_frac"] > 0]
    text = (f"final expert load CV {last['expert_max_cv']:.3f} (worst MoE layer, steps {last['step'] - every + 1}-"
            f"{last['step']}); {every}-step windows in which a routed expert got no tokens: {len(collapsed)} of "
            f"{len(rows)}")  # fmt: skip
    return text + (f" (ending at steps {', '.join(map(str, collapsed[:8]))})" if collapsed else "")


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that accepts calls and writes nothing."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, flops_per_token: float, world: int):
        self.cfg, self.enabled, self.world = cfg, enabled, world
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(cfg.log.peak_flops) * world
        self.path = run_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._wandb = self._init_wandb(run_dir) if enabled and cfg.log.wandb else None
        self._reset_interval()

    def _init_wandb(self, run_dir: Path):
        mode = os.environ.get("WANDB_MODE", self.cfg.log.wandb_mode)
        if mode == "disabled":
            return None
        try:
            import wandb

            from .config import config_dict

            # One wandb run id per run directory, so the pieces of a resumed run are one run after `wandb sync`.
            run_id = f"{self.cfg.name}-{sha256_bytes(str(run_dir.resolve()).encode())[:8]}"
            return wandb.init(project=self.cfg.log.wandb_project, name=self.cfg.name, dir=str(run_dir), id=run_id,
                              resume="allow", mode=mode, config=config_dict(self.cfg), reinit="finish_previous")  # fmt: skip
        except Exception as e:  # metrics must never stop training
            log.warning("wandb unavailable (%s); metrics.jsonl only", e)
            return None

    def _reset_interval(self) -> None:
        self._t0, self._tokens, self._load = time.perf_counter(), 0, None

    def write(self, row: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(row, sort_keys=True) + "\n")
            self._file.flush()

    def event(self, kind: str, **fields: Any) -> None:
        self.write({"event": kind, **fields, "time": time.time()})

    def step(self, row: dict[str, Any], tokens: int, load_LE: torch.Tensor | None) -> list[dict[str, Any]]:
        """Record one step; every `log.every` steps also the console line. Returns dead-expert alarms."""
        self._tokens += tokens
        if load_LE is not None and load_LE.numel():
            self._load = load_LE.clone() if self._load is None else self._load + load_LE
        alarms: list[dict[str, Any]] = []
        if row["step"] % self.cfg.log.every == 0:
            row = dict(row, **self._interval_stats())
            alarms = dead_experts(self._load) if self._load is not None else []
            self._console(row)
            self._reset_interval()
        self.write(row)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row["step"])
        for alarm in alarms:
            log.warning("expert collapse: MoE layer %d got no tokens for experts %s over the last %d steps",
                        alarm["moe_layer"], alarm["experts"], self.cfg.log.every)  # fmt: skip
        return alarms

    def _interval_stats(self) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps = self._tokens / elapsed
        out: dict[str, Any] = {"tokens_per_s": tps}
        if self.peak > 0:
            out["mfu"] = tps * self.flops_per_token / self.peak
        if self._load is not None:
            bal = expert_balance(self._load)
            out.update({f"expert_{k}": v for k, v in bal.items() if k != "layers"})
            out["expert_layers"] = bal["layers"]
        return out

    def _console(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = (f"step {row['step']:>6} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
                f"grad {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s")  # fmt: skip
        if "mfu" in row:
            text += f" | MFU {100 * row['mfu']:.1f}%"
        if "expert_max_cv" in row:
            text += f" | experts cv {row['expert_max_cv']:.2f} dead {row['expert_dead_frac']:.2f}"
        if row.get("skipped"):
            text += f" | SKIPPED ({row['skip_reason']})"
        log.info(text)

    def summary(self, fields: dict[str, Any]) -> None:
        """Run-level facts (the ledger identity): the wandb run summary and a `summary` line in metrics.jsonl."""
        if not fields or not self.enabled:
            return
        self.event("summary", **fields)
        if self._wandb is not None:
            self._wandb.summary.update(fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

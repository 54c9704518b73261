"""`kmoe train`: train the MoE from a run config (one process, or one rank of torchrun)."""

from __future__ import annotations

import argparse
import logging
import os

from kmoe.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the model of a run config (multi-rank: under torchrun)")
    p.add_argument("--config", required=True, help="a configs/train/*.yaml run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    p.add_argument(
        "--resume",
        default="none",
        help="'auto': latest complete checkpoint of the run dir (fresh start if none); a checkpoint dir; or 'none'",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print config, sizes and parallel layout; train nothing"
    )
    p.add_argument(
        "--world-size", type=int, help="dry run: plan for this many ranks (default: $WORLD_SIZE or 1)"
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.config import load_run_config, validate

    cfg = load_run_config(args.config, args.set)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size=world)
    if args.dry_run:
        return _dry_run(args, cfg, world)
    from training.parallel import init_distributed, shutdown
    from training.trainer import Trainer

    info = init_distributed()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    try:
        ledger = _ledger(run_dir) if info.is_main else None  # one writer: rank 0
        code = Trainer(cfg, run_dir, info, ledger=ledger).run(args.resume)
    finally:
        shutdown(info)
    if code:
        emit(f"train: stopped on request with a checkpoint; exit {code} (requeue me)")
    else:
        emit(f"train: finished {cfg.train.steps} steps; run directory {run_dir}")
    return code


def _ledger(run_dir):
    """The run's tamper-evident ledger (rank 0 only)."""
    from training.ledger import Ledger

    return Ledger.open(run_dir)


def _dry_run(args: argparse.Namespace, cfg, world: int) -> int:
    import json

    from kmoe.cmd_model import cmd_info
    from kmoe.configtree import dump_yaml
    from training.dims import layout

    emit("# resolved config\n" + dump_yaml(cfg))
    cmd_info(argparse.Namespace(config=args.config, set=args.set, seq_len=cfg.data.seq_len, json=False))
    emit("parallel layout: " + json.dumps(layout(cfg, world)))
    if cfg.engine.name == "deepspeed":
        from training.engines.deepspeed.memory import plan_lines, zero_memory_plan

        emit("\n".join(plan_lines(zero_memory_plan(cfg, world))))
    return 0

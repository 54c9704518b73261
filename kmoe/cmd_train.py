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
        "--world-size",
        type=int,
        help="dry run: plan for this many ranks (default: $WORLD_SIZE, else the launch: section's nodes x ranks)",
    )
    p.add_argument(
        "--key",
        help="the ledger's Ed25519 private key file (default: found by the key id the ledger names; "
        "a new run creates <key dir>/<key id>.ed25519)",
    )
    p.add_argument("--key-dir", help="folder of signing keys (default: $KMOE_KEY_DIR, else <runs>/.keys)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.config import load_run_config, validate

    cfg = load_run_config(args.config, args.set)
    world = (
        args.world_size
        or int(os.environ.get("WORLD_SIZE", "0"))
        or (cfg.launch.world_size if args.dry_run else 1)
    )
    validate(cfg, world_size=world)
    if args.dry_run:
        return _dry_run(args, cfg, world)
    from training.metrics import balance_summary
    from training.parallel import init_distributed, shutdown
    from training.preflight import agreed, check_run
    from training.trainer import Trainer

    info = init_distributed()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    try:  # nothing is written until every rank has passed the checks
        agreed(info, lambda: check_run(cfg, info, run_dir, args.resume, args.key, args.key_dir))
        ledger = agreed(info, lambda: _ledger(run_dir, info, args))  # one writer: rank 0
        code = Trainer(cfg, run_dir, info, ledger=ledger).run(args.resume)
    finally:
        shutdown(info)
    if code:
        emit(f"train: stopped on request with a checkpoint; exit {code} (requeue me)")
    else:
        emit(f"train: finished {cfg.train.steps} steps; run directory {run_dir}")
    if info.is_main and (balance := balance_summary(run_dir / "metrics.jsonl", cfg.log.every)):
        emit(f"train: {balance}")
    return code


def _ledger(run_dir, info, args):
    """The run's tamper-evident ledger (rank 0 only; None elsewhere)."""
    from training.ledger import Ledger

    return Ledger.open(run_dir, key_path=args.key, key_dir=args.key_dir) if info.is_main else None


def _dry_run(args: argparse.Namespace, cfg, world: int) -> int:
    import json

    from kmoe.cmd_model import cmd_info
    from kmoe.configtree import dump_yaml
    from training.dims import layout

    emit("# resolved config\n" + dump_yaml(cfg))
    cmd_info(argparse.Namespace(config=args.config, set=args.set, seq_len=cfg.data.seq_len, json=False))
    emit("parallel layout: " + json.dumps(layout(cfg, world)))
    if cfg.engine.name == "native":
        from training.memory_plan import format_plan, memory_plan

        emit(format_plan(memory_plan(cfg, world)))  # validate() refused it already if it cannot fit
    elif cfg.engine.name == "deepspeed":
        from training.engines.deepspeed.memory import plan_lines, zero_memory_plan

        emit("\n".join(plan_lines(zero_memory_plan(cfg, world))))
    return 0

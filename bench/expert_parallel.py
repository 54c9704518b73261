"""Training throughput with expert parallelism EP=2 against EP=1 (plain FSDP2), both on the same 2 gloo ranks,
measured in one run: the native engine, the same config and weights, each rank its own micro-batch of random
tokens, steps of the two engines interleaved (shared machines drift). Prints tokens/s of each and the ratio.

On CPU the ranks share this machine's cores and gloo's all-to-all goes through loopback TCP, so the ratio
says what EP costs or saves here, not on GPUs (docs/gpu-validation.md).

    .venv/bin/python bench/expert_parallel.py [--config configs/train/tiny.yaml] [--steps 5] [--micro 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2


def _engine(args, ep: int):
    from training.config import load_run_config
    from training.engines import build_engine
    from training.parallel import DistInfo

    sets = [*args.set, "parallel.strategy=fsdp", f"parallel.expert_parallel={ep}",
            f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro * WORLD}"]  # fmt: skip
    cfg = load_run_config(args.config, sets)
    rank = dist.get_rank()
    engine = build_engine(cfg, DistInfo(rank, WORLD, rank, torch.device("cpu")))
    engine.build(cfg.train.seed)
    return cfg, engine


def _rank(rank: int, args, store: str, out: str) -> None:
    from training.engines import MicroBatch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    engines = {f"EP={ep}": _engine(args, ep) for ep in (1, 2)}
    cfg = next(iter(engines.values()))[0]
    gen = torch.Generator().manual_seed(100 + rank)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (args.micro, cfg.data.seq_len + 1), generator=gen)
        micro = MicroBatch(tokens[:, :-1], tokens[:, 1:], torch.ones(args.micro, cfg.data.seq_len),
                           loss_scale=1.0 / tokens[:, 1:].numel(), aux_scale=1.0, last=True)  # fmt: skip
        for name, (_, engine) in engines.items():
            dist.barrier()
            t0 = time.perf_counter()
            engine.train_batch([micro])
            engine.step(cfg.train.lr)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
            if i >= args.warmup:
                times[name].append(float(elapsed))
    if rank == 0:
        tokens_per_step = WORLD * args.micro * cfg.data.seq_len
        lines = [f"{args.config}: {WORLD} gloo ranks x {args.micro} sequences x {cfg.data.seq_len} tokens, "
                 f"{cfg.model.num_experts} experts top-{cfg.model.num_experts_per_tok}, "
                 f"{torch.get_num_threads()} thread(s) per rank, median of {args.steps} steps"]  # fmt: skip
        tps = {}
        for name, ts in times.items():
            sec = sorted(ts)[len(ts) // 2]
            tps[name] = tokens_per_step / sec
            lines.append(f"{name:<5} {sec * 1e3:9.1f} ms/step {tps[name]:10,.0f} tokens/s")
        lines.append(f"EP=2 / EP=1 tokens/s: {tps['EP=2'] / tps['EP=1']:.2f}x")
        Path(out).write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train/tiny.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--micro", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per engine (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.txt")
        mp.start_processes(
            _rank, args=(args, str(Path(tmp) / "store"), out), nprocs=WORLD, start_method="spawn"
        )
        sys.stdout.write(Path(out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ledger overhead per training step, against the tiny model's real train step measured in the same run.

Train step: the native engine's step (forward, backward, clip, AdamW, router-bias update) of the tiny model
(configs/model/tiny.yaml) on random tokens, as the trainer runs it.
Ledger step: what the trainer adds per step for the audit record: the batch token hash (tensor_digest),
expert-load statistics and one fsynced `Ledger.step()` record with the global batch's sample indices.
Prints both medians and their ratio; the target is under 1%.

    .venv/bin/python bench/ledger_overhead.py [--batch 8] [--seq-len 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kmoe.hashing import tensor_digest
from training.config import load_run_config
from training.engines import MicroBatch, build_engine
from training.ledger import Ledger
from training.parallel import DistInfo

REPO = Path(__file__).resolve().parents[1]


def random_batch(cfg, gen: torch.Generator) -> torch.Tensor:
    b, s = cfg.train.global_batch_size, cfg.data.seq_len
    return torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)


def time_train(cfg, steps: int) -> tuple[list[float], list]:
    engine = build_engine(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    engine.build(cfg.train.seed)
    gen = torch.Generator().manual_seed(0)
    times, loads = [], []
    for i in range(steps + 2):
        tokens = random_batch(cfg, gen)
        micro = MicroBatch(tokens[:, :-1], tokens[:, 1:], torch.ones(tokens.shape[0], tokens.shape[1] - 1),
                           loss_scale=1.0 / tokens[:, 1:].numel(), aux_scale=1.0, last=True)  # fmt: skip
        t0 = time.perf_counter()
        engine.train_batch([micro])
        loads.append(engine.step(cfg.train.lr).expert_load_LE)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return times, loads


def time_ledger(cfg, loads: list, records: int, fsync: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger.open(Path(d) / "runs" / "bench", fsync=fsync)
        ledger.genesis(config={"bench": True}, seed=0, init_state={"w": "0" * 64})
        b = cfg.train.global_batch_size
        tokens = random_batch(cfg, torch.Generator().manual_seed(1))
        times = []
        for i in range(records):
            t0 = time.perf_counter()
            ledger.step(
                i + 1, tokens=(i + 1) * tokens.numel(), loss=3.0 + 1e-3 * i, grad_norm=1.0, lr=3e-4,
                lang_tokens={"ko": 1000, "en": 800, "ja": 300, "code": 200},
                sample_indices=list(range(i * b, (i + 1) * b)), batch_hash=tensor_digest(tokens),
                expert_load=loads[i % len(loads)],
            )  # fmt: skip
            times.append(time.perf_counter() - t0)
        ledger.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--records", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    sets = [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
            f"data.seq_len={args.seq_len}"]  # fmt: skip
    cfg = load_run_config(REPO / "configs/model/tiny.yaml", sets)
    train, loads = time_train(cfg, args.steps)
    led = time_ledger(cfg, loads, args.records, fsync=True)
    led_nofsync = time_ledger(cfg, loads, args.records, fsync=False)
    t_train, t_led, t_nf = statistics.median(train), statistics.median(led), statistics.median(led_nofsync)
    print(
        f"tiny MoE train step (batch {args.batch} x seq {args.seq_len}, {torch.get_num_threads()} threads): "
        f"median {t_train * 1e3:.1f} ms over {len(train)} steps"
    )
    print(
        f"ledger per step (batch hash + expert stats + fsynced record): median {t_led * 1e3:.3f} ms "
        f"over {len(led)} records (without fsync {t_nf * 1e3:.3f} ms)"
    )
    print(f"overhead ratio ledger/train = {t_led / t_train:.4%} (target < 1%)")


if __name__ == "__main__":
    main()

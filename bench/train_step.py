"""Training-step throughput of kmoe's native engine vs transformers' Glm4MoeForCausalLM and kmoe's deepspeed
engine (ZeRO, one process), and with --megatron kmoe's megatron-core engine, same config and weights.

Prints tokens/s and achieved FLOP/s (model FLOPs per token x tokens/s, model/params.py) as a share of this
machine's fp32 matmul FLOP/s measured in the same run; both models train one step = forward, backward,
gradient clip and AdamW on the same token batch, in fp32 on CPU (bf16 autocast on GPU for ours is not used
here so both run the same precision).

    .venv/bin/python bench/train_step.py [--config configs/train/tiny.yaml] [--steps 5] [--batch 8] [--zero-stage 3]
    PYTHONPATH=tests/megatron_site .venv/bin/python bench/train_step.py --megatron   # on a CPU machine

The deepspeed engine runs on one process here (ZeRO's partitioning and hooks, without peers to talk to): its
ratio to the native engine is DeepSpeed's per-step overhead on this model, not a multi-rank scaling figure.
--megatron adds the megatron engine (one rank) at the same shape and prints its tokens/s against the native
engine's, measured in the same run. megatron-core needs CUDA; on CPU it runs only under the tests' redirect
(tests/megatron_site), which this script does not load itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import model_state, save_model_dir  # noqa: E402
from model.export_hf import export_hf  # noqa: E402
from model.params import human, model_size  # noqa: E402
from training.config import config_dict, load_run_config  # noqa: E402
from training.engines import MicroBatch, build_engine  # noqa: E402
from training.parallel import DistInfo  # noqa: E402


def matmul_flops(n: int = 1024, reps: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this process (the roofline the ratios are taken against)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def timed_interleaved(steps: dict, n: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each candidate, alternating them step by step (shared machines drift)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def ours_step(engine, tokens: torch.Tensor, lr: float):
    n = tokens.numel() - tokens.shape[0]

    def step():
        mb = MicroBatch(tokens[:, :-1], tokens[:, 1:], torch.ones(tokens.shape[0], tokens.shape[1] - 1),
                        loss_scale=1.0 / n, aux_scale=1.0, last=True)  # fmt: skip
        engine.train_batch([mb])
        engine.step(lr)

    return step


def hf_step(model, tokens: torch.Tensor, cfg):
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay, foreach=False)  # fmt: skip

    def step():
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/train/tiny.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--batch", type=int, help="sequences per step (default: train.micro_batch_size)")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--megatron", action="store_true", help="also time the megatron-core engine (one rank)")
    ap.add_argument(
        "--zero-stage", type=int, default=3, choices=(1, 2, 3), help="ZeRO stage of the deepspeed engine"
    )
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = load_run_config(args.config, args.set)
    batch, seq = args.batch or cfg.train.micro_batch_size, cfg.data.seq_len
    size = model_size(cfg.model, seq)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)
    )
    peak = matmul_flops()
    print(f"config {args.config}: {human(size.total)} params ({human(size.active)} active), batch {batch} x seq {seq}, "
          f"{torch.get_num_threads()} threads; training FLOPs/token {human(size.flops_train_per_token)}")  # fmt: skip
    print(f"measured fp32 matmul: {peak / 1e9:.1f} GFLOP/s")

    engine = build_engine(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    engine.build(cfg.train.seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_dir(Path(tmp) / "ckpt", model_state(engine.model), config_dict(cfg))
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf", dtype="float32")
        from transformers import Glm4MoeForCausalLM

        hf = Glm4MoeForCausalLM.from_pretrained(str(Path(tmp) / "hf"), dtype=torch.float32).train()
    # One micro-batch of `batch` sequences per step, as the native step above takes (DeepSpeed checks it).
    ds_sets = ["engine.name=deepspeed", f"engine.zero_stage={args.zero_stage}", f"train.global_batch_size={batch}",
               f"train.micro_batch_size={batch}"]  # fmt: skip
    ds_cfg = load_run_config(args.config, args.set + ds_sets)
    ds_engine = build_engine(ds_cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    ds_engine.build(ds_cfg.train.seed)
    ds_name = f"kmoe deepspeed ZeRO-{args.zero_stage}"
    steps = {
        "kmoe native": ours_step(engine, tokens, cfg.train.lr),
        "transformers Glm4Moe": hf_step(hf, tokens, cfg),
        ds_name: ours_step(ds_engine, tokens, cfg.train.lr),
    }
    if args.megatron:
        mcfg = load_run_config(args.config, [*args.set, "engine.name=megatron", "model.balance_loss_coeff=0"])
        megatron = build_engine(mcfg, DistInfo(0, 1, 0, torch.device("cpu")))
        megatron.build(cfg.train.seed)  # the same seeded weights as the native engine
        steps["kmoe megatron"] = ours_step(megatron, tokens, cfg.train.lr)
    results = {}
    for name, sec in timed_interleaved(steps, args.steps, args.warmup).items():
        tps = batch * seq / sec
        achieved = tps * size.flops_train_per_token
        results[name] = tps
        print(f"{name:<26} {sec * 1e3:8.1f} ms/step  {tps:10,.0f} tokens/s  {achieved / 1e9:7.2f} GFLOP/s  "
              f"= {100 * achieved / peak:5.1f}% of measured fp32 matmul")  # fmt: skip
    ours, theirs = results["kmoe native"], results["transformers Glm4Moe"]
    print(f"kmoe native / transformers tokens/s: {ours / theirs:.2f}x")
    if "kmoe megatron" in results:
        print(f"kmoe megatron / kmoe native tokens/s: {results['kmoe megatron'] / ours:.2f}x")
    print(f"{ds_name} / kmoe native tokens/s: {results[ds_name] / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

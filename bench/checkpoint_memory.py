"""Sharded checkpoints vs the full-state checkpoints they replace: peak RSS of rank 0 during save and load,
save throughput against plain torch.save of the same bytes, and a streaming HF export's peak RSS against the
checkpoint's size. Everything is measured in one run on the same FSDP2-sharded model and state.

Per rank, in order (each phase starts from the peak-RSS counter reset, /proc/self/clear_refs 5):
  sharded save     training/checkpoint.py: every rank writes its own shards (DCP), hashing as it writes
  full-state save  what kmoe did before (kmoe-train-checkpoint/1): full_state_dict + cpu_offload gathers
                   model and optimizer onto rank 0, which writes model.safetensors and optimizer.safetensors
  torch.save       each rank torch.save's the same local tensors the sharded save wrote (the baseline bytes)
  sharded load     DCP reads each rank's blocks and the loaded tensors' digests are checked
  full-state load  every rank reads the full model and optimizer files and set_*_state_dict(full_state_dict)
Then, in a fresh process, `kmoe export hf` of the sharded checkpoint (streaming; peak RSS vs size).

    .venv/bin/python bench/checkpoint_memory.py [--ranks 4] [--layers 4] [--out DIR]

Default model: configs/train/small.yaml with 4 of its 16 layers (243M parameters; fp32 weights + AdamW
moments 2.9 GB); the full 0.9B model's full-state baseline (10.8 GB on rank 0 alone, plus every rank's
shard) does not fit beside other work on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss() -> int:
    return _status("VmHWM")


def rss() -> int:
    return _status("VmRSS")


def phase(name: str, fn, results: dict) -> None:
    import gc

    gc.collect()
    dist.barrier()
    reset_peak()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    dist.barrier()
    results[name] = {"peak_rss": peak_rss(), "seconds": seconds}


def hashing_seconds(flat: dict) -> float:
    """What the sharded save spends hashing this rank's bytes: the file's sha256 and the digest pieces."""
    import hashlib

    from kmoe.hashing import box_pieces, meta_of, tensor_raw

    t = time.perf_counter()
    for v in flat.values():
        local = v.to_local() if hasattr(v, "to_local") else v
        hashlib.sha256(tensor_raw(local)[2]).digest()
        box_pieces(meta_of(local), (0,) * local.dim(), local)
    return time.perf_counter() - t


def full_state_save(engine, path: Path) -> None:
    """kmoe-train-checkpoint/1's writes: the whole state gathered to rank 0, which writes it."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(engine.wrapped, options=opts)
    optim = get_optimizer_state_dict(engine.wrapped, engine.optimizer, options=opts)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.items()}, str(path / "model.safetensors"))
        flat = {f"{n}/{k}": v.contiguous() for n, s in optim["state"].items() for k, v in s.items()}
        save_file(flat, str(path / "optimizer.safetensors"))


def full_state_load(engine, path: Path) -> None:
    from safetensors.torch import load_file

    from training.checkpoint_legacy import unflatten_optimizer

    model = load_file(str(path / "model.safetensors"))
    optim = unflatten_optimizer(
        load_file(str(path / "optimizer.safetensors")), engine.state_dict()["optimizer"]["param_groups"]
    )
    engine.load_state_dict({"model": model, "optimizer": optim}, full=True)


def rank_main(rank: int, world: int, store: str, out: str, layers: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from training import checkpoint as ckpt
    from training.config import config_dict, load_run_config
    from training.engines import build_engine
    from training.parallel import DistInfo

    cfg = load_run_config(REPO / "configs/train/small.yaml", [f"model.num_layers={layers}", "parallel.strategy=fsdp",
                                                               f"train.global_batch_size={2 * world}"])  # fmt: skip
    engine = build_engine(cfg, DistInfo(rank, world, rank, torch.device("cpu")))
    engine.build(cfg.train.seed)
    state = engine.state_dict()  # creates the optimizer's moments (zero-lr step): the full checkpoint state
    res: dict = {"baseline_rss": rss()}
    root, full, plain = Path(out) / "sharded", Path(out) / "full", Path(out) / "plain"
    flat = ckpt.flatten_state(state)

    def sharded_save() -> None:
        host = None
        if rank == 0:
            ts = {"trainer": {"step": 1, "tokens": 0}, "world_size": world, "reason": "bench", "host_rng": {}}
            host = ckpt.HostState(
                config_dict(cfg),
                ts,
                {"rank0": {"cpu": torch.get_rng_state()}},
                state["optimizer"]["param_groups"],
            )
        ckpt.finish_save(ckpt.begin_save(root, 1, flat, host))

    def torch_save() -> None:
        plain.mkdir(parents=True, exist_ok=True)
        local = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in flat.items()}
        torch.save(local, plain / f"rank{rank}.pt")
        with open(plain / f"rank{rank}.pt", "rb") as f:
            os.fsync(f.fileno())

    def sharded_load() -> None:
        path = ckpt.step_dir(root, 1)
        manifest = ckpt.read_manifest(path)
        target = ckpt.flatten_state(engine.state_dict())
        ckpt.load_into(path, manifest, target)
        engine.load_state_dict(ckpt.unflatten_state(target, ckpt.load_host(path, manifest)["param_groups"]))

    phase("sharded_save", sharded_save, res)
    phase("full_state_save", lambda: full_state_save(engine, full), res)
    phase("torch_save", torch_save, res)
    phase("sharded_load", sharded_load, res)
    phase("full_state_load", lambda: full_state_load(engine, full), res)
    res["hash_seconds"] = hashing_seconds(flat)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def export_peak(ckpt_dir: Path, out: Path, tokenizer: str | None) -> dict:
    """`kmoe export hf` in this (fresh) process: peak RSS over the export alone."""
    from model.export_hf import export_hf

    base = rss()
    reset_peak()
    t = time.perf_counter()
    summary = export_hf(ckpt_dir, out, dtype="float32", tokenizer_dir=tokenizer, max_shard_bytes=256 << 20)
    res = {
        "peak_rss": peak_rss(),
        "before": base,
        "seconds": time.perf_counter() - t,
        "files": len(summary["shards"]),
    }
    from model.hf_check import compare_logits  # after the measurement: it loads both models whole

    res["logit_diff"] = compare_logits(ckpt_dir, out)
    if tokenizer:
        from transformers import AutoTokenizer

        res["tokenizer"] = type(AutoTokenizer.from_pretrained(str(out))).__name__
    return res


def human(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def report(out: Path, world: int, layers: int, exp: dict) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    r0 = ranks[0]
    ck = out / "sharded/step-00000001"
    shard_bytes = sum(f.stat().st_size for f in ck.rglob("shard-*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in (ck / "model").glob("*.safetensors"))
    full_bytes = sum(f.stat().st_size for f in (out / "full").glob("*.safetensors"))
    print(f"small.yaml with {layers} layers, {world} gloo ranks (FSDP2); shard files {human(shard_bytes)} "
          f"(full-state files {human(full_bytes)})")  # fmt: skip
    print(f"rank 0 RSS after building model + optimizer: {human(r0['baseline_rss'])}")
    for op in ("save", "load"):
        new, old = r0[f"sharded_{op}"]["peak_rss"], r0[f"full_state_{op}"]["peak_rss"]
        print(
            f"peak RSS of rank 0 during {op}: sharded {human(new)}, full-state {human(old)}: ratio {new / old:.2f}"
        )
        extra_new, extra_old = new - r0["baseline_rss"], old - r0["baseline_rss"]
        print(
            f"  above the trained state it already holds: sharded {human(extra_new)}, full-state {human(extra_old)}"
        )
    t_new = max(r["sharded_save"]["seconds"] for r in ranks)
    t_plain = max(r["torch_save"]["seconds"] for r in ranks)
    t_full = max(r["full_state_save"]["seconds"] for r in ranks)
    print(
        f"save time (slowest rank): sharded {t_new:.2f} s ({shard_bytes / t_new / 2**20:.0f} MiB/s, files hashed and "
        f"digested while written), torch.save of the same local tensors {t_plain:.2f} s, full-state {t_full:.2f} s"
    )
    print(
        f"save throughput ratio sharded / torch.save: {t_plain / t_new:.2f} (hashing this machine's bytes takes "
        f"{max(r['hash_seconds'] for r in ranks):.2f} s of it: sha256 without SHA instructions)"
    )
    print(
        f"export hf (streaming, fp32): peak RSS {human(exp['peak_rss'])} (process before export "
        f"{human(exp['before'])}) for a checkpoint whose model part is {human(model_bytes)}: "
        f"ratio {exp['peak_rss'] / model_bytes:.2f}; {exp['files']} safetensors files; {exp['seconds']:.1f} s"
    )
    print(
        f"  transformers loads it (tokenizer: {exp.get('tokenizer', 'none given')}); max |logit diff| vs kmoe "
        f"{exp['logit_diff']:.2e} (fp32)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", help="working directory (default: a temporary one, removed)")
    ap.add_argument(
        "--tokenizer",
        default=str(REPO / ".cache/demo/data/tokenizer"),
        help="included in the export when present",
    )
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kmoe-ckpt-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        mp.start_processes(rank_main, args=(args.ranks, str(out / "store"), str(out), args.layers), nprocs=args.ranks,
                           start_method="spawn")  # fmt: skip
        tok = args.tokenizer if (Path(args.tokenizer) / "tokenizer.json").is_file() else None
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:  # a fresh process: its peak RSS is the export's
            exp = pool.apply(export_peak, (out / "sharded/step-00000001", out / "hf", tok))
        report(out, args.ranks, args.layers, exp)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()

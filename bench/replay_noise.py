"""How far float-order noise moves a replay, against what a changed batch or changed weights move it.

On a run directory of `kmoe train` (one process, checkpoints at K and K+N), replays K -> K+N four ways and prints
the largest relative step deviation (loss, grad norm) and the weights' relative distance to the recorded
checkpoint (distance / size of the update K -> K+N), as `kmoe audit replay` judges them:

  recorded env   the genesis' thread count set (expected: bit for bit)
  other threads  1 thread if the run had more, else 2: float-order noise only
  changed batch  the record of step K+2 names the next step's batch (indices and hash), at both thread counts
  changed weights  the recorded K+N weights with a relative edit of 1e-4 (each tensor + 1e-4 x its RMS x noise)

and the ratios of the changed cases to the noise, which the default tolerances sit between.

    .venv/bin/python bench/replay_noise.py .cache/demo/runs/tiny [--from-step -2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's data_prep/, not bench/data_prep.py

from kmoe.hashing import sha256_json  # noqa: E402
from model.checkpoint import load_model_dir  # noqa: E402
from training.audit.init_check import read_genesis  # noqa: E402
from training.audit.replay import replay, resolve_span  # noqa: E402
from training.ledger_chain import LEDGER_FILE, read_lines  # noqa: E402


def alter_batch(run_dir: Path, out: Path, step: int) -> Path:
    """A copy whose `step` record names the batch of `step + 1` (rechained; replay does not check signatures)."""
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("wandb"))
    recs = [ln.record for ln in read_lines(out / LEDGER_FILE) if ln.record is not None]
    steps = {r["step"]: r for r in recs if r["kind"] == "step"}
    steps[step]["samples"], steps[step]["batch_hash"] = (
        steps[step + 1]["samples"],
        steps[step + 1]["batch_hash"],
    )
    prev = "0" * 64
    for i, r in enumerate(recs):
        r["seq"], r["prev"] = i, prev
        prev = sha256_json(r)
    (out / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def weight_edit_distance(run_dir: Path, start: int, end: int, eps: float = 1e-4) -> float:
    """Relative distance (as replay computes it) of the K+N weights edited by `eps` x RMS noise per tensor."""
    _, theta0 = load_model_dir(run_dir / f"checkpoints/step-{start:08d}")
    _, theta = load_model_dir(run_dir / f"checkpoints/step-{end:08d}")
    gen = torch.Generator().manual_seed(0)
    num = den = 0.0
    for k, t in theta.items():
        t = t.double()
        rms = t.pow(2).mean().sqrt()
        num += float((eps * rms * torch.randn(t.shape, generator=gen, dtype=torch.float64)).norm() ** 2)
        den += float((t - theta0[k].double()).norm() ** 2)
    return math.sqrt(num) / math.sqrt(den)


def row(name: str, res) -> dict:
    dev = res.max_deviation
    print(f"{name:<28} loss {dev.get('loss', 0):9.2e}  grad_norm {dev.get('grad_norm', 0):9.2e}  weights "
          f"{'bitwise' if res.bitwise else f'{res.relative_distance:9.2e}'}  first divergence "
          f"{res.first_divergence}")  # fmt: skip
    return {
        "loss": dev.get("loss", 0.0),
        "grad_norm": dev.get("grad_norm", 0.0),
        "weights": res.relative_distance or 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--from-step", type=int, default=-2)
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    start, n = resolve_span(args.run_dir, args.from_step, args.steps)
    recorded = int(
        ((read_genesis(args.run_dir).get("environment") or {}).get("numerics") or {}).get("threads") or 1
    )
    other = 1 if recorded > 1 else 2
    print(f"{args.run_dir}: steps {start + 1}..{start + n}, trained at {recorded} thread(s)")
    row("recorded env", replay(args.run_dir, start, n))
    noise = row(f"other threads ({other})", replay(args.run_dir, start, n, threads=other))
    with tempfile.TemporaryDirectory() as tmp:
        altered = alter_batch(args.run_dir, Path(tmp) / "run", start + 2)
        batch = row(f"changed batch (step {start + 2})", replay(altered, start, n))
        row(f"changed batch, {other} threads", replay(altered, start, n, threads=other))
    edit = weight_edit_distance(args.run_dir, start, start + n)
    print(f"{'changed weights (1e-4 edit)':<28} weights {edit:9.2e}")
    for key in ("loss", "grad_norm", "weights"):
        if noise[key] > 0:
            print(f"changed batch / noise, {key}: {batch[key] / noise[key]:.1e}")
    if noise["weights"] > 0:
        print(f"changed weights / noise, weights: {edit / noise['weights']:.1e}")


if __name__ == "__main__":
    main()

"""A minimal reference training loop that writes a run directory and its ledger the way the trainer does.

It exists so the audit tools, their tests, `bench/ledger_overhead.py` and `make demo-audit` have a real run
to work on: the real MoETransformer, AdamW, random tokens, kmoe checkpoints (model.safetensors + config.yaml
+ digests.json) plus optimizer, RNG and data-position files. It is not the trainer (training/trainer.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from kmoe.hashing import named_merkle_root, sha256_bytes, sha256_json, state_digests, tensor_digest
from model import MoETransformer, init_weights
from model.checkpoint import load_model_dir, model_state, save_model_dir
from training.config import RunConfig, config_dict, load_run_config
from training.ledger import Ledger

log = logging.getLogger(__name__)
LANGS = ("ko", "en", "ja", "code")


@dataclass
class MiniRun:
    cfg: RunConfig
    model: MoETransformer
    opt: torch.optim.AdamW
    gen: torch.Generator  # the "data loader": tokens drawn from a seeded generator
    step: int = 0
    tokens: int = 0


def make_config(overrides: list[str] | None = None) -> RunConfig:
    base = [
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "data.seq_len=32",
        "train.warmup_steps=0",
    ]
    path = Path(__file__).resolve().parents[2] / "configs/model/tiny.yaml"
    return load_run_config(path, base + list(overrides or []))


def build(cfg: RunConfig) -> MiniRun:
    model = MoETransformer(cfg.model)
    init_weights(model, cfg.model, cfg.train.seed)
    t = cfg.train
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay
    )
    gen = torch.Generator().manual_seed(t.seed + 1)
    return MiniRun(cfg, model, opt, gen)


def batch(run: MiniRun) -> tuple[torch.Tensor, list[int]]:
    b, s = run.cfg.train.global_batch_size, run.cfg.data.seq_len
    tokens = torch.randint(0, run.cfg.model.vocab_size, (b, s + 1), generator=run.gen)
    return tokens, list(range(run.step * b, (run.step + 1) * b))


def train_step(run: MiniRun, tokens: torch.Tensor) -> tuple[float, float]:
    """One forward/backward/AdamW step; returns (loss, grad norm)."""
    out = run.model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    total = loss + out.aux_loss if out.aux_loss is not None else loss
    run.opt.zero_grad(set_to_none=True)
    total.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip).item()
    run.opt.step()
    return loss.item(), gnorm


def logged_step(run: MiniRun, ledger: Ledger) -> None:
    tokens, indices = batch(run)
    loss, gnorm = train_step(run, tokens)
    load = run.model.update_router_bias()
    run.step += 1
    run.tokens += tokens[:, :-1].numel()
    share = tokens.shape[0] // len(LANGS) or 1
    lang = {lg: tokens[:, :-1].shape[1] * share for lg in LANGS[: tokens.shape[0] // share]}
    ledger.step(
        run.step, tokens=run.tokens, loss=loss, grad_norm=gnorm, lr=run.opt.param_groups[0]["lr"],
        lang_tokens=lang, sample_indices=indices, batch_hash=tensor_digest(tokens), expert_load=load,
    )  # fmt: skip


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    sd = opt.state_dict()
    return {f"{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}


def save_checkpoint(run: MiniRun, ledger: Ledger, run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / f"step-{run.step:08d}"
    state = model_state(run.model)
    save_model_dir(path, state, config_dict(run.cfg))
    torch.save(run.opt.state_dict(), path / "optimizer.pt")
    rng = run.gen.get_state()
    torch.save({"data_rng": rng}, path / "rng.pt")
    position = {"step": run.step, "tokens": run.tokens}
    (path / "data_position.json").write_text(json.dumps(position))
    roots = {
        "model": named_merkle_root(state_digests(state)),
        "optimizer": named_merkle_root(state_digests(optimizer_tensors(run.opt))),
        "rng": sha256_bytes(rng.numpy().tobytes()),
        "data": sha256_json(position),
    }
    ledger.checkpoint(run.step, path, tokens=run.tokens, roots=roots)
    return path


def start(run_dir: Path, cfg: RunConfig, key_path: Path | None = None) -> tuple[MiniRun, Ledger]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    run = build(cfg)
    ledger = Ledger.open(run_dir, key_path)
    ledger.genesis(
        config=config_dict(cfg),
        seed=cfg.train.seed,
        init_state=model_state(run.model),
        data_manifest_root=sha256_json({"demo": "random tokens", "seed": cfg.train.seed + 1}),
        tokenizer_hash=None,
    )
    return run, ledger


def resume(run_dir: Path, ckpt: Path, key_path: Path | None = None) -> tuple[MiniRun, Ledger]:
    """Reopen the ledger, load checkpoint `ckpt` and record the resume and the weight load."""
    ledger = Ledger.open(run_dir, key_path)
    _, state = load_model_dir(ckpt, verify=True)
    cfg = _cfg_from_dir(ckpt)
    run = build(cfg)
    run.model.load_state_dict(state)
    run.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    run.gen.set_state(torch.load(ckpt / "rng.pt", weights_only=True)["data_rng"])
    pos = json.loads((ckpt / "data_position.json").read_text())
    run.step, run.tokens = pos["step"], pos["tokens"]
    root = named_merkle_root(state_digests(state))
    ledger.resume(ckpt, run.step, root)
    return run, ledger


def _cfg_from_dir(ckpt: Path) -> RunConfig:
    from kmoe import configtree

    return configtree.from_dict(RunConfig, configtree.read_yaml(ckpt / "config.yaml"))


def mini_run(
    run_dir: str | Path, steps: int, ckpt_every: int, overrides: list[str] | None = None, **kw: Any
) -> Path:
    """Train `steps` steps from scratch with a checkpoint every `ckpt_every`; close the ledger."""
    run_dir = Path(run_dir)
    run, ledger = start(run_dir, make_config(overrides), kw.get("key_path"))
    for _ in range(steps):
        logged_step(run, ledger)
        if ckpt_every and run.step % ckpt_every == 0:
            save_checkpoint(run, ledger, run_dir)
    ledger.close()
    return run_dir

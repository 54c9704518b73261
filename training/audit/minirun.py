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
from training.audit.replay import register_engine
from training.config import RunConfig, config_dict, load_run_config
from training.ledger import Ledger

log = logging.getLogger(__name__)
LANGS = ("ko", "en", "ja", "code")
TRAINER = "kmoe-minirun"  # recorded in genesis; `kmoe audit replay` picks the replay engine by it


@dataclass
class MiniRun:
    cfg: RunConfig
    model: MoETransformer
    opt: torch.optim.AdamW
    data_seed: int  # the synthetic corpus: sample i is a function of (data_seed, i) alone
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
    return MiniRun(cfg, model, opt, data_seed=t.seed + 1)


def samples(data_seed: int, indices: list[int], seq_len: int, vocab: int) -> torch.Tensor:
    """Random-token sequences addressed by sample index, so a recorded batch can be re-read (replay)."""
    rows = []
    for i in indices:
        gen = torch.Generator().manual_seed(int(sha256_json([data_seed, i])[:15], 16))
        rows.append(torch.randint(0, vocab, (seq_len + 1,), generator=gen))
    return torch.stack(rows)


def batch(run: MiniRun) -> tuple[torch.Tensor, list[int]]:
    b = run.cfg.train.global_batch_size
    indices = list(range(run.step * b, (run.step + 1) * b))
    return samples(run.data_seed, indices, run.cfg.data.seq_len, run.cfg.model.vocab_size), indices


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
    lang: dict[str, int] = {}
    for i in indices:  # sample i of the synthetic corpus is labelled language LANGS[i % 4]
        lang[LANGS[i % len(LANGS)]] = lang.get(LANGS[i % len(LANGS)], 0) + tokens.shape[1] - 1
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
    rng = torch.get_rng_state()
    torch.save({"torch_rng": rng}, path / "rng.pt")
    position = {"step": run.step, "tokens": run.tokens, "data_seed": run.data_seed}
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
        trainer=TRAINER,
    )
    return run, ledger


def load_checkpoint(ckpt: Path) -> MiniRun:
    """Model, optimizer, RNG and data position exactly as saved at `ckpt` (tensors verified)."""
    _, state = load_model_dir(ckpt, verify=True)
    run = build(_cfg_from_dir(ckpt))
    run.model.load_state_dict(state)
    run.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True)["torch_rng"])
    pos = json.loads((ckpt / "data_position.json").read_text())
    run.step, run.tokens, run.data_seed = pos["step"], pos["tokens"], pos["data_seed"]
    return run


def resume(run_dir: Path, ckpt: Path, key_path: Path | None = None) -> tuple[MiniRun, Ledger]:
    """Reopen the ledger, load checkpoint `ckpt` and record the resume and the weight load."""
    ledger = Ledger.open(run_dir, key_path)
    run = load_checkpoint(ckpt)  # verified against digests.json, under the scheme it names
    ledger.resume(ckpt, run.step, json.loads((ckpt / "digests.json").read_text())["merkle_root"])
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


class MiniEngine:
    """Replay engine of this loop (`kmoe audit replay` on a run whose genesis names `kmoe-minirun`)."""

    def __init__(self, run_dir: Path, shards: str | None = None):
        self.run: MiniRun | None = None  # the synthetic corpus needs no shards

    def load(self, checkpoint_dir: Path) -> None:
        self.run = load_checkpoint(checkpoint_dir)

    def batch(self, samples_rec: dict[str, Any]) -> torch.Tensor:
        assert self.run is not None
        idx = samples_rec.get("list") or list(
            range(samples_rec["start"], samples_rec["start"] + samples_rec["count"])
        )
        return samples(self.run.data_seed, idx, self.run.cfg.data.seq_len, self.run.cfg.model.vocab_size)

    def step(self, batch_tokens: torch.Tensor) -> dict[str, float]:
        assert self.run is not None
        loss, gnorm = train_step(self.run, batch_tokens)
        self.run.model.update_router_bias()
        return {"loss": loss, "grad_norm": gnorm}

    def model_state(self) -> dict[str, torch.Tensor]:
        assert self.run is not None
        return model_state(self.run.model)


register_engine(TRAINER, MiniEngine)

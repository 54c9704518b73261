"""`kmoe audit compare` separates independent models from a derived one, even when the derived one is permuted.

Models are the tiny MoE trained by kmoe's trainer on the toy shards: A and B from different seeds
(independent); D is A trained further on other batches, then given a function-preserving permutation of its
residual basis, of every MLP's hidden units and of each layer's experts, and saved as a Hugging Face
(Glm4Moe-named) directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from toy_runs import built_trainer, tiny_model, toy_config

from kmoe.cli import main
from model.checkpoint import model_state, save_model_dir
from model.export_hf import hf_tensors
from training.audit.lineage import compare_models
from training.config import config_dict
from training.trainer import Trainer

OTHER = 1000  # D's further training reads the stream from this batch on: data A never saw


def trained(shards: Path, seed: int, steps: int, first: int = 0, start: Trainer | None = None) -> Trainer:
    """The tiny MoE after `steps` trainer steps on batches first.. (continuing `start` when given)."""
    if start is None:
        sets = [f"train.seed={seed}", "train.steps=1500", "train.global_batch_size=2", "train.micro_batch_size=2",
                "data.seq_len=32", "train.schedule=constant", "train.lr=3e-4", "train.warmup_steps=0"]  # fmt: skip
        start = built_trainer(toy_config(shards, *tiny_model(), *sets))
    for i in range(first, first + steps):
        start.replay_step(start.data.global_batch(i))
    return start


class Model:
    """What the comparisons read of a trained trainer: its config and weights."""

    def __init__(self, trainer: Trainer):
        self.cfg, self.state = trainer.cfg, model_state(trainer.engine.model)


def save_kmoe(run: Model, path: Path) -> Path:
    save_model_dir(path, run.state, config_dict(run.cfg))
    return path


def permuted_hf(run: Model, path: Path, seed: int = 0) -> Path:
    """Save `run` as an HF-named dir after permuting residual dims, MLP units and experts (same function)."""
    g = torch.Generator().manual_seed(seed)
    sd = dict(hf_tensors(run.cfg.model, run.state))
    d = run.cfg.model.hidden_size
    r = torch.randperm(d, generator=g)
    for k, v in list(sd.items()):
        if k.endswith(
            ("embed_tokens.weight", "lm_head.weight", "_proj.weight", "mlp.gate.weight")
        ) and not k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = v[:, r]  # reads the residual stream
        elif (
            k.endswith(("o_proj.weight", "down_proj.weight"))
            or k.endswith("layernorm.weight")
            or k == "model.norm.weight"
        ):
            sd[k] = v[r]  # writes (or scales) the residual stream
    for k in [k for k in sd if k.endswith("gate_proj.weight")]:
        pre = k.removesuffix("gate_proj.weight")
        u = torch.randperm(sd[k].shape[0], generator=g)
        sd[k], sd[pre + "up_proj.weight"] = sd[k][u], sd[pre + "up_proj.weight"][u]
        sd[pre + "down_proj.weight"] = sd[pre + "down_proj.weight"][:, u]
    for i in range(run.cfg.model.num_layers):
        pre = f"model.layers.{i}.mlp."
        if pre + "gate.weight" not in sd:
            continue
        e = torch.randperm(run.cfg.model.num_experts, generator=g).tolist()
        sd[pre + "gate.weight"] = sd[pre + "gate.weight"][e]
        sd[pre + "gate.e_score_correction_bias"] = sd[pre + "gate.e_score_correction_bias"][e]
        old = {
            j: {p: sd[f"{pre}experts.{j}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            for j in e
        }
        for new_j, old_j in enumerate(e):
            for p, t in old[old_j].items():
                sd[f"{pre}experts.{new_j}.{p}.weight"] = t
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "glm4_moe"}))
    return path


def check_separation(shards: Path, tmp_path: Path, finetune_steps: int) -> tuple[dict, dict]:
    a = trained(shards, 1, 20)
    path_a = save_kmoe(Model(a), tmp_path / "a")
    path_b = save_kmoe(Model(trained(shards, 2, 20)), tmp_path / "b")
    path_d = permuted_hf(Model(trained(shards, 1, finetune_steps, first=OTHER, start=a)), tmp_path / "d")
    indep, derived = compare_models(path_a, path_b), compare_models(path_a, path_d)
    assert indep["verdict"] == "independent", (indep["p_value"], indep["p_value_identity"])
    assert min(indep["p_value"], indep["p_value_identity"]) > 1e-3
    assert derived["verdict"] == "derived" and derived["p_value"] < 1e-30
    # the permutation hides lineage from the same-coordinates view; only the robust test sees through it
    assert derived["p_value_identity"] > 1e-3
    assert np.mean([g["rho"] for g in derived["groups"]]) > 0.9
    return indep, derived


def test_compare_separates_independent_from_permuted_derived(shards, tmp_path, capsys):
    indep, _ = check_separation(shards, tmp_path, finetune_steps=100)
    assert main(["audit", "compare", str(tmp_path / "a"), str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "verdict: DERIVED" in out and "rho(gate,up)" in out and "layer 1 expert" in out
    assert "raw cosine of norm weights is high for ANY two models" in out
    norms = indep["norms"]  # shared drift of each norm tensor fools the raw measure, inflates the global one
    assert norms["raw_cosine"] > 0.99
    assert norms["global_centred_correlation"] > abs(norms["centred_correlation"]) + 0.1
    assert abs(norms["centred_correlation"]) < 0.2
    main(["audit", "compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert "verdict: INDEPENDENT" in capsys.readouterr().out


@pytest.mark.full
def test_compare_after_a_few_hundred_finetune_steps(shards, tmp_path):
    check_separation(shards, tmp_path, finetune_steps=400)

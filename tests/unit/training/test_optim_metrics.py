"""Weight-decay groups, gradient clipping, expert-balance statistics and the collapse alarm."""

import json

import torch

from model import ModelConfig, MoETransformer
from training import optim
from training.metrics import balance_summary, dead_experts, expert_balance

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=16,
                  first_k_dense=1, dense_intermediate_size=32, num_experts=4, expert_intermediate_size=16,
                  qk_norm=True)  # fmt: skip


def test_no_decay_on_norms_and_router_bias_is_not_optimised():
    model = MoETransformer(CFG)
    opt = optim.build_optimizer(model, __import__("training.config").config.TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = optim.no_decay_names(model)
    assert names and all("norm" in n for n in names)
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.layers[1].mlp.router.expert_bias) not in optimised
    assert id(model.layers[1].mlp.router.weight) in {id(p) for p in decay["params"]}


def test_clip_scales_to_max_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = optim.grad_norm([p])
    assert norm == 5.0
    optim.clip_([p], 1.0, norm)
    assert abs(optim.grad_norm([p]) - 1.0) < 1e-5


def test_expert_balance_and_dead_alarm():
    load = torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    bal = expert_balance(load)
    assert bal["layers"][0]["cv"] == 0.0 and bal["layers"][1]["max_share"] == 1.0
    assert bal["dead_frac"] == 0.75
    assert dead_experts(load) == [{"moe_layer": 1, "experts": [1, 2, 3]}]


def test_balance_summary_counts_each_interval_once_after_a_resume(tmp_path):
    rows = [{"step": 10, "expert_max_cv": 0.9, "expert_dead_frac": 0.25},
            {"step": 20, "expert_max_cv": 0.5, "expert_dead_frac": 0.0},
            {"event": "resume", "step": 15},
            {"step": 20, "expert_max_cv": 0.4, "expert_dead_frac": 0.125},  # redone after the resume: this one counts
            {"step": 30, "expert_max_cv": 0.2, "expert_dead_frac": 0.0}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert balance_summary(path, 10) == (
        "final expert load CV 0.200 (worst MoE layer, steps 21-30); 10-step windows in which a routed expert "
        "got no tokens: 2 of 3 (ending at steps 10, 20)"
    )
    assert balance_summary(tmp_path / "none.jsonl", 10) == ""

"""Weight-decay groups, gradient clipping, expert-balance statistics and the collapse alarm."""

import torch

from model import ModelConfig, MoETransformer
from training import optim
from training.metrics import dead_experts, expert_balance

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

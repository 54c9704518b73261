"""The pure parts of expert parallelism: regrouping received rows by local expert, and load counting that a
recomputing backward (activation checkpointing) does not repeat."""

import torch

from model import ModelConfig
from model.moe import MoE
from training.expert_parallel import regroup_index


def test_regroup_index_orders_rows_by_local_expert_then_source():
    counts_SL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 source ranks, 3 local experts
    # received rows, source-major: s0e0 s0e0 s0e2 | s1e0 s1e1 s1e1 s1e1
    labels = ["0/0a", "0/0b", "0/2", "1/0", "1/1a", "1/1b", "1/1c"]
    order = regroup_index(counts_SL)
    assert [labels[i] for i in order] == ["0/0a", "0/0b", "1/0", "1/1a", "1/1b", "1/1c", "0/2"]
    assert sorted(order.tolist()) == list(range(7))  # a permutation: nothing dropped, nothing twice
    assert regroup_index(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


def test_load_is_counted_only_while_count_load_is_set():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=16,
                      num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16)  # fmt: skip
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 8, cfg.hidden_size)
    moe(x)
    assert moe.load_E.sum() == 2 * 8 * 2
    moe.count_load = False  # what an engine sets while backward recomputes checkpointed forwards
    moe(x)
    assert moe.load_E.sum() == 2 * 8 * 2

"""Routing math as pure functions: selection, weights, bias, balance statistics and losses."""

import torch

from model import router as R


def test_topk_picks_highest_scores_and_normalises():
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0], [1.0, -2.0, 4.0, 0.5]])
    r = R.route(logits, None, top_k=2)
    assert sorted(r.experts_TK[0].tolist()) == [1, 3]
    assert sorted(r.experts_TK[1].tolist()) == [0, 2]
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(2))
    s = logits.sigmoid()
    expected = s[0, [1, 3]] / s[0, [1, 3]].sum()
    torch.testing.assert_close(r.weights_TK[0].sort().values, expected.sort().values)


def test_scaling_and_unnormalised_weights():
    logits = torch.tensor([[0.5, 1.5, -0.5]])
    r = R.route(logits, None, top_k=2, norm_topk_prob=False, scaling=2.5)
    torch.testing.assert_close(
        r.weights_TK[0].sort().values, (logits.sigmoid()[0, [0, 1]] * 2.5).sort().values
    )


def test_bias_changes_selection_but_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the top-2
    r = R.route(logits, bias, top_k=2)
    assert 3 in r.experts_TK[0].tolist() and 0 in r.experts_TK[0].tolist()
    s = logits.sigmoid()[0]
    chosen = r.experts_TK[0]
    # weights come from unbiased scores of the chosen experts
    torch.testing.assert_close(r.weights_TK[0], s[chosen] / s[chosen].sum())


def test_softmax_scores_sum_to_one():
    r = R.route(torch.randn(5, 6), None, top_k=3, score="softmax")
    torch.testing.assert_close(r.scores_TE.sum(-1), torch.ones(5))


def test_expert_counts_and_load_stats():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1]])
    counts = R.expert_counts(experts, 4)
    assert counts.tolist() == [3, 2, 1, 0]
    stats = R.load_stats(counts)
    assert stats["dead_frac"] == 0.25
    assert abs(stats["max_share"] - 0.5) < 1e-12 and stats["min_share"] == 0.0
    assert stats["cv"] > 0
    assert R.load_stats(torch.tensor([4, 4, 4, 4]))["cv"] == 0.0


def test_bias_update_moves_towards_balance():
    bias = torch.zeros(4)
    new = R.bias_update(bias, torch.tensor([10, 2, 4, 4]), rate=0.1)
    # mean 5: overloaded expert 0 goes down, underloaded ones go up
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.1, 0.1]))


def test_sequence_balance_loss_is_minimal_when_uniform():
    b, s, e, k = 1, 8, 4, 1
    uniform_scores = torch.full((b, s, e), 0.5)
    balanced = torch.arange(s).remainder(e).view(b, s, k)
    skewed = torch.zeros(b, s, k, dtype=torch.long)
    low = R.sequence_balance_loss(uniform_scores, balanced)
    high = R.sequence_balance_loss(uniform_scores.clone().index_fill_(-1, torch.tensor([0]), 5.0), skewed)
    assert abs(low.item() - 1.0) < 1e-6  # sum_i f_i P_i = 1 at perfect balance
    assert high.item() > low.item()


def test_z_loss_grows_with_logit_scale():
    x = torch.randn(16, 8)
    assert R.z_loss(10 * x) > R.z_loss(x)

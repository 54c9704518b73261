"""Dropless MoE: grouped-mm and loop expert paths agree; bias updates; the dispatch is exact."""

import pytest
import torch

from model import ModelConfig, MoETransformer, init_weights
from model.moe import MoE, grouped_mm_applies


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
        num_experts=8, num_experts_per_tok=2, expert_intermediate_size=16, num_shared_experts=1,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def _moe_pair(cfg):
    a, b = MoE(cfg), MoE(cfg)
    torch.manual_seed(0)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.2)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_mm_and_loop_agree_forward_and_backward():
    cfg = _cfg()
    gmm, loop = _moe_pair(cfg)
    gmm.cfg = _cfg(moe_impl="grouped_mm")
    loop.cfg = _cfg(moe_impl="loop")
    x = torch.randn(3, 10, cfg.hidden_size)
    assert grouped_mm_applies(x.view(-1, cfg.hidden_size), gmm.experts.gate_proj)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = gmm(xa), loop(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), (_, pb) in zip(gmm.named_parameters(), loop.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_dispatch_matches_dense_per_token_reference():
    cfg = _cfg(moe_impl="loop", num_shared_experts=0)
    moe, _ = _moe_pair(cfg)
    x = torch.randn(1, 6, cfg.hidden_size)
    y = moe(x)[0]
    from model import router as R

    r = R.route(moe.router(x[0]), moe.router.expert_bias, cfg.num_experts_per_tok)
    ex = moe.experts
    for t in range(6):
        ref = torch.zeros(cfg.hidden_size)
        for k in range(cfg.num_experts_per_tok):
            e = r.experts_TK[t, k]
            h = torch.nn.functional.silu(ex.gate_proj[e] @ x[0, t]) * (ex.up_proj[e] @ x[0, t])
            ref += r.weights_TK[t, k] * (ex.down_proj[e] @ h)
        torch.testing.assert_close(y[t], ref, atol=1e-5, rtol=1e-5)


def test_bias_update_uses_observed_load_and_resets():
    cfg = _cfg(bias_update_rate=0.01)
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=3)
    model.train()
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    load = model.expert_load()
    assert load.shape == (2, 8) and load.sum().item() == 2 * 16 * 2 * 2
    observed = model.update_router_bias()
    torch.testing.assert_close(observed, load)
    assert model.expert_load().sum().item() == 0
    bias = model.moe_layers()[0].router.expert_bias
    assert bias.abs().max().item() == pytest.approx(0.01)
    assert not bias.requires_grad


def test_aux_losses_only_when_configured_and_training():
    cfg = _cfg(balance_loss_coeff=0.01, z_loss_coeff=0.001)
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model.train()(tokens)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    assert model.eval()(tokens).aux_loss is None
    assert MoETransformer(_cfg(balance_loss_coeff=0.0)).train()(tokens).aux_loss is None

"""kmoe <-> megatron-core weight conversion without megatron processes: layouts, coverage, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kmoe.configtree import ConfigError
from model import ModelConfig, MoETransformer, init_weights
from model.checkpoint import model_state
from model.export_hf import hf_tensors
from training.engines.megatron import convert, shard
from training.engines.megatron.spec import Layout, check_expressible, moe_layer_pattern

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, first_k_dense=1,
    dense_intermediate_size=48, num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16,
    qk_norm=True, rotary_fraction=0.5, balance_loss_coeff=0.0,  # megatron refuses kmoe's balance loss
)  # fmt: skip


def ours_state(cfg: ModelConfig = CFG) -> dict[str, torch.Tensor]:
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=5)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    return model_state(model)


def test_qkv_uses_megatrons_per_group_interleaving():
    heads, groups, k, d = 4, 2, 3, 5
    q = torch.arange(heads * k * d, dtype=torch.float32).view(heads * k, d)
    kk = -torch.arange(1, groups * k * d + 1, dtype=torch.float32).view(groups * k, d)
    v = kk - 1000
    fused = convert.fuse_qkv(q, kk, v, heads, groups).view(groups, heads // groups + 2, k, d)
    # group 1 holds query heads 2 and 3, then key head 1, then value head 1
    assert torch.equal(fused[1, 0], q.view(heads, k, d)[2])
    assert torch.equal(fused[1, 1], q.view(heads, k, d)[3])
    assert torch.equal(fused[1, 2], kk.view(groups, k, d)[1])
    assert torch.equal(fused[1, 3], v.view(groups, k, d)[1])
    back = convert.split_qkv(fused.reshape(-1, d), heads, groups, k)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, kk, v)))


def test_round_trip_is_exact_and_experts_keep_their_global_index():
    ours = ours_state()
    meg = convert.to_megatron(CFG, ours)
    fc1 = meg["decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert torch.equal(
        fc1, torch.cat([ours["layers.2.mlp.experts.gate_proj"][3], ours["layers.2.mlp.experts.up_proj"][3]])
    )
    assert "decoder.layers.0.mlp.linear_fc1.weight" in meg  # dense first layer
    back = convert.from_megatron(CFG, meg)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)  # fmt: skip


def test_expert_bias_maps_to_megatron_and_to_hf_e_score_correction_bias():
    ours = ours_state()
    meg = convert.to_megatron(CFG, ours)
    bias = meg["decoder.layers.1.mlp.router.expert_bias"]
    assert bias.abs().max() > 0 and torch.equal(bias, ours["layers.1.mlp.router.expert_bias"])
    hf = dict(hf_tensors(CFG, convert.from_megatron(CFG, meg)))
    assert torch.equal(hf["model.layers.1.mlp.gate.e_score_correction_bias"], bias)


def test_a_deleted_expert_fails_naming_it():
    meg = convert.to_megatron(CFG, ours_state())
    del meg["decoder.layers.2.mlp.experts.local_experts.1.linear_fc2.weight"]
    with pytest.raises(convert.ConversionError, match=r"local_experts\.1\.linear_fc2\.weight"):
        convert.from_megatron(CFG, meg)
    ours = ours_state()
    ours["layers.1.mlp.experts.down_proj"] = ours["layers.1.mlp.experts.down_proj"][:3]  # 3 of 4 experts
    with pytest.raises(convert.ConversionError, match=r"layers\.1\.mlp\.experts\.down_proj.*\[3, 32, 16\]"):
        convert.to_megatron(CFG, ours)


def test_an_extra_or_missing_tensor_fails_naming_it():
    meg = convert.to_megatron(CFG, ours_state())
    meg["decoder.layers.2.mlp.experts.local_experts.4.linear_fc1.weight"] = torch.zeros(32, 32)
    with pytest.raises(convert.ConversionError, match=r"local_experts\.4\.linear_fc1"):
        convert.from_megatron(CFG, meg)
    ours = ours_state()
    del ours["layers.1.mlp.router.expert_bias"]
    with pytest.raises(convert.ConversionError, match=r"layers\.1\.mlp\.router\.expert_bias"):
        convert.to_megatron(CFG, ours)


def test_expert_shards_from_two_ranks_merge_once_and_never_overwrite():
    meg = convert.to_megatron(CFG, ours_state())
    # what each of two expert-parallel ranks holds: local experts 0..1, renamed to their global index
    ranks = []
    for ep_rank in range(2):
        local = {}
        for name, t in meg.items():
            m = convert.EXPERT_NAME.match(name)
            if m and int(m.group(2)) // 2 != ep_rank:
                continue
            local_name = f"{m.group(1)}{int(m.group(2)) % 2}{m.group(3)}" if m else name
            local[local_name] = t
        ranks.append({convert.globalize(n, 0, ep_rank * 2): t for n, t in local.items()})
    merged = convert.merge_rank_states(ranks)
    assert set(merged) == set(meg)
    assert all(torch.equal(merged[k], meg[k]) for k in meg)
    with pytest.raises(convert.ConversionError, match="two ranks"):
        convert.merge_rank_states([ranks[0], ranks[0]])  # rank 1 mislabelled as rank 0: experts 0-1 twice


def test_transformer_engine_names_are_read():
    meg = convert.to_megatron(CFG, ours_state())
    te = {}
    for name, t in meg.items():
        # TE fuses the input norm into linear_qkv, and a dense layer's pre-MLP norm into linear_fc1
        name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        name = name.replace("layers.0.pre_mlp_layernorm.weight", "layers.0.mlp.linear_fc1.layer_norm_weight")
        m = convert.EXPERT_NAME.match(name)
        if m:
            fc = m.group(3)[len(".linear_fc") : len(".linear_fc") + 1]
            name = name.replace(
                f"local_experts.{m.group(2)}.linear_fc{fc}.weight", f"linear_fc{fc}.weight{m.group(2)}"
            )
        te[name] = t
        te[name.rsplit(".", 1)[0] + "._extra_state"] = None
    assert "decoder.layers.1.mlp.experts.linear_fc1.weight3" in te
    back = convert.from_megatron(CFG, te)
    assert set(back) == set(ours_state())


def test_tp_slices_follow_megatrons_layouts():
    place = shard.RankPlace(tp_rank=1, tp=2, layer_offset=0, expert_offset=0)
    fc1 = torch.arange(8.0).view(8, 1)  # gate rows 0..3, up rows 4..7
    assert shard.take_slice("x.mlp.linear_fc1.weight", fc1, (4, 1), place).flatten().tolist() == [2, 3, 6, 7]
    proj = torch.arange(8.0).view(2, 4)
    assert shard.take_slice("x.linear_proj.weight", proj, (2, 2), place).tolist() == [[2, 3], [6, 7]]
    assert shard.take_slice("x.expert_bias", proj, (2, 4), place) is proj
    with pytest.raises(convert.ConversionError, match="not a 1/2 slice"):
        shard.take_slice("x.linear_proj.weight", proj, (2, 3), place)
    pp = shard.RankPlace(tp_rank=0, tp=1, layer_offset=2, expert_offset=4)
    assert pp.global_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight") == (
        "decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight"
    )


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(norm_topk_prob=False), "model.norm_topk_prob"),
        (dict(num_experts_per_tok=1), "model.norm_topk_prob"),
        (dict(router_score="softmax"), "model.router_score"),
        (dict(balance_loss_coeff=0.01), "model.balance_loss_coeff"),
        (dict(z_loss_coeff=0.001), "model.z_loss_coeff"),
    ],
)
def test_what_megatron_cannot_express_is_refused_naming_the_key(change, key):
    cfg = ModelConfig(**{**CFG.__dict__, **change})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_expressible(cfg, Layout(), use_te=False)


@pytest.mark.parametrize(
    "layout, key",
    [
        (Layout(tp=3), "parallel.tensor_parallel"),
        (Layout(ep=3), "parallel.expert_parallel"),
        (Layout(pp=2), "parallel.pipeline_parallel"),
        (Layout(cp=2), "parallel.context_parallel"),
    ],
)
def test_layouts_megatron_cannot_build_are_refused_naming_the_key(layout, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_expressible(CFG, layout, use_te=False)


def test_dense_first_layers_become_moe_layer_freq():
    assert moe_layer_pattern(CFG) == [0, 1, 1]


def _rank_state(full: dict, tp_rank: int, tp: int, ep_rank: int, ep: int, stage: range, last: bool) -> dict:
    """What one megatron rank holds (local names), cut from a full one-rank state as shard.py cuts it."""
    local_e, out = CFG.num_experts // ep, {}
    etp = 1 if ep > 1 else tp  # spec.Layout.etp: experts are TP-split only without expert parallelism
    place = shard.RankPlace(tp_rank, tp, stage.start, ep_rank * local_e, etp_rank=tp_rank % etp, etp=etp)
    for name, t in full.items():
        m = convert._LAYER.match(name)
        if m and int(m.group(1)) not in stage:
            continue
        if not m and not (stage.start == 0 if name.startswith("embedding") else last):
            continue  # the embedding lives on the first stage, the final norm and LM head on the last
        e = convert.EXPERT_NAME.match(name)
        if e and int(e.group(2)) // local_e != ep_rank:
            continue
        local = name
        if m:
            local = f"decoder.layers.{int(m.group(1)) - stage.start}.{m.group(2)}"
        if e:
            local = convert.EXPERT_NAME.sub(
                lambda x: f"{x.group(1)}{int(x.group(2)) % local_e}{x.group(3)}", local
            )
        split = {"linear_proj.weight": 1, "linear_fc2.weight": 1}
        dim = next((d for suffix, d in split.items() if name.endswith(suffix)), 0)
        shape = list(t.shape)
        size = etp if e else tp
        if size > 1 and t.dim() == 2 and "router" not in name:
            shape[dim] //= size
        out[local] = shard.take_slice(name, t, tuple(shape), place)
    return out, place


@pytest.mark.parametrize("tp, ep, pp", [(2, 1, 1), (1, 2, 1), (1, 1, 3), (2, 2, 1)])
def test_rank_blocks_cover_every_kmoe_tensor_exactly_once(tp, ep, pp):
    ours = ours_state()
    full = convert.to_megatron(CFG, ours)
    rebuilt = {k: torch.zeros_like(v) for k, v in ours.items()}
    cover = {k: torch.zeros_like(v, dtype=torch.int32) for k, v in ours.items()}
    per = CFG.num_layers // pp
    for s in range(pp):
        for tp_rank in range(tp):
            for ep_rank in range(ep):
                state, place = _rank_state(
                    full, tp_rank, tp, ep_rank, ep, range(s * per, (s + 1) * per), s == pp - 1
                )
                for name, offsets, block in shard.kmoe_blocks(CFG, state, place):
                    index = tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))
                    rebuilt[name][index] = block
                    cover[name][index] += 1
    for name in ours:  # replicated tensors come once per holder; sharded ones exactly once in total
        assert torch.equal(rebuilt[name], ours[name]), name
        assert cover[name].min() >= 1, name
    # experts: split over EP (whole on each TP rank) or, without EP, over TP; attention: split over TP
    assert cover["layers.1.mlp.experts.gate_proj"].max() == (tp if ep > 1 else 1)
    assert (
        cover["layers.1.attn.o_proj.weight"].max() == ep
        and cover["layers.0.mlp.gate_proj.weight"].max() == ep
    )


def test_megatron_on_a_cpu_without_the_test_redirect_is_refused_naming_the_engine():
    from training.config import load_run_config
    from training.engines import build_engine
    from training.parallel import DistInfo

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the megatron engine runs")
    toy = Path(__file__).resolve().parents[3] / "configs/train/toy.yaml"
    cfg = load_run_config(str(toy), ["engine.name=megatron", "model.balance_loss_coeff=0"])
    with pytest.raises(ConfigError, match=r"engine\.name: megatron needs CUDA"):
        build_engine(cfg, DistInfo(0, 1, 0, torch.device("cpu")))

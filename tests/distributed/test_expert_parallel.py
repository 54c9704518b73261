"""Expert parallelism in the native engine (training/expert_parallel.py) on in-process gloo ranks.

The MoE layer under EP computes what the one-process layer computes while each rank holds and runs only its
E/ep experts on the token rows it received through all-to-all; training under EP x FSDP follows the
one-process run (step 1 exactly, later steps within the drift plain FSDP itself shows); activation
checkpointing changes neither losses nor expert counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multirank import rank_info, run_distributed_test

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs/train/toy.yaml")
TINY = str(REPO / "configs/train/tiny.yaml")


def _reference_moe(cfg):
    """A one-process MoE layer with random weights and router bias (identical on every rank)."""
    from model.moe import MoE

    torch.manual_seed(0)
    ref = MoE(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        ref.router.expert_bias.normal_(0, 0.05)
    return ref


def moe_layer_run(ep: int) -> dict:
    """One MoE layer, this rank's own tokens: the EP layer against the full layer on every rank."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    from model.moe import MoE
    from training.config import load_run_config
    from training.expert_parallel import expert_mesh, shard_experts

    cfg = load_run_config(TOY).model
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = _reference_moe(cfg)
    x_BSD = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + rank))
    ref_out = ref(x_BSD)
    ref_out.square().sum().backward()
    with torch.device("meta"):
        moe = MoE(cfg)
    mesh = expert_mesh("cpu", world, ep)
    shard_experts(moe, mesh)
    group = mesh["ep"].get_group()  # the ranks that exchange tokens with this one
    moe.to_empty(device="cpu")
    full = ref.state_dict()
    with torch.no_grad():
        for name, t in moe.state_dict(keep_vars=True).items():
            src = full[name]
            if hasattr(t, "device_mesh"):
                src = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)
            (t.to_local() if hasattr(t, "to_local") else t).copy_(
                src.to_local() if hasattr(src, "to_local") else src
            )
    moe.load_E.zero_()  # not persistent: to_empty left it uninitialised
    seen: dict = {}
    compute = moe.experts.forward

    def spy(x_ND, counts, impl="auto"):
        seen.update(rows=x_ND.shape[0], counts=counts.tolist())
        return compute(x_ND, counts, impl)

    moe.experts.forward = spy
    out = moe(x_BSD)
    out.square().sum().backward()
    global_load = ref.load_E.clone()
    dist.all_reduce(global_load, group=group)  # the routing decisions of every rank of the expert group
    local = cfg.num_experts // ep
    mine = slice((rank % ep) * local, (rank % ep + 1) * local)
    ref_grad = ref.experts.gate_proj.grad.clone()
    dist.all_reduce(ref_grad, group=group)  # an expert's gradient: its group's tokens routed to it

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {
        "out_diff": rel(out.detach(), ref_out.detach()),
        "local_experts": moe.experts.gate_proj.to_local().shape[0],
        "seen": seen,
        "expected_counts": global_load[mine].long().tolist(),
        "load_same": torch.equal(moe.load_E, ref.load_E),
        "router_grad_diff": rel(moe.router.weight.grad, ref.router.weight.grad),
        "expert_grad_diff": rel(moe.experts.gate_proj.grad.to_local(), ref_grad[mine]),
    }


@pytest.mark.parametrize("world,ep", [(2, 2), pytest.param(4, 2, marks=pytest.mark.full)])
def test_each_rank_runs_only_its_experts_on_tokens_it_received(world, ep):
    from training.config import load_run_config

    cfg = load_run_config(TOY).model
    for r in run_distributed_test(moe_layer_run, world, args=(ep,)):
        assert r["local_experts"] == cfg.num_experts // ep
        # The rows its experts computed are all tokens of the expert group routed to its experts.
        assert r["seen"]["counts"] == r["expected_counts"] and r["seen"]["rows"] == sum(r["expected_counts"])
        assert r["out_diff"] < 1e-6 and r["router_grad_diff"] < 1e-6 and r["expert_grad_diff"] < 1e-6
        assert r["load_same"]  # the load counts this rank's routing decisions, all E experts


def train_run(shards: str, steps: int, overrides: tuple[str, ...], config: str = TOY) -> list[dict]:
    """`steps` trainer steps of `config` on batches 0..steps-1: loss and global expert load of each."""
    import tempfile

    import torch.distributed as dist
    from toy_runs import one_process

    from training.config import load_run_config
    from training.trainer import Trainer

    base = [f"data.shards={shards}", f"train.steps={steps}", "log.wandb=false", "train.eval_every=0"]
    cfg = load_run_config(config, base + list(overrides))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), rank_info() if dist.is_initialized() else one_process())
        trainer.build(write_metrics=False)
        out = []
        for i in range(steps):
            res = trainer.replay_step(trainer.data.global_batch(i))
            out.append(
                {"loss": res.loss, "load": res.load_LE.long().tolist(), "layout": trainer.engine.layout()}
            )
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from toy_shards import write_toy_shards

    return str(write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=80))


def test_activation_checkpointing_changes_neither_losses_nor_expert_counts(shards):
    ep2 = ("parallel.expert_parallel=2",)
    plain = run_distributed_test(train_run, 2, args=(shards, 4, ep2))[0]
    ac = run_distributed_test(train_run, 2, args=(shards, 4, (*ep2, "train.activation_checkpointing=true")))[
        0
    ]
    assert [s["loss"] for s in ac] == [s["loss"] for s in plain]
    assert [s["load"] for s in ac] == [s["load"] for s in plain]
    tokens = 8 * 32 * 2  # global batch x seq len x top-k: each routing decision counted once per layer
    assert all(sum(layer) == tokens for s in ac for layer in s["load"])
    assert ac[0]["layout"]["activation_checkpointing"] and ac[0]["layout"]["expert_parallel"] == 2


def tiny_run(shards: str, steps: int, overrides: tuple[str, ...]) -> list[dict]:
    """configs/train/tiny.yaml (model, batch, schedule) on the toy shards, micro-batches of 4 (4 ranks)."""
    return train_run(shards, steps, ("train.micro_batch_size=4", *overrides), config=TINY)


def _drift(a: list[dict], b: list[dict]) -> tuple[list[float], list[float]]:
    """Per step: relative loss difference, and the largest expert-count difference as a share of the total."""
    loss = [abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b, strict=True)]
    counts = [
        max(
            max(abs(p - q) for p, q in zip(lx, ly, strict=True)) / sum(ly)
            for lx, ly in zip(x["load"], y["load"])
        )
        for x, y in zip(a, b, strict=True)
    ]
    return loss, counts


@pytest.fixture(scope="module")
def tiny_shards(shards) -> str:
    """The demo shards the tiny config trains on (`make demo-data`), else the toy shards."""
    demo = REPO / ".cache/demo/data"
    return str(demo) if (demo / "manifest.json").is_file() else shards


# The router settings the equivalence is measured under: the former defaults (bias step 0.001, no balance loss),
# as the issue measured plain FSDP x4. With today's bias step of 0.01 the sign update turns each route a rounding
# difference flips into a 10x larger bias change and every multi-rank layout, plain FSDP x4 included, leaves the
# one-process run within ~12 steps (measured: FSDP x4 4.6e-3 of the loss and 19% of the counts by step 20, EP=4
# 8.4e-3 and 20%): the chaos of the bias update, not EP's numerics, which this test isolates.
ROUTER = ("model.bias_update_rate=0.001", "model.balance_loss_coeff=0")


@pytest.mark.full
def test_ep_on_four_ranks_follows_the_single_process_run(tiny_shards):
    steps, shards = 20, tiny_shards
    single = tiny_run(shards, steps, ROUTER)
    fsdp4 = run_distributed_test(tiny_run, 4, args=(shards, steps, (*ROUTER, "parallel.strategy=fsdp")))[0]
    ep2 = run_distributed_test(tiny_run, 4, args=(shards, steps, (*ROUTER, "parallel.expert_parallel=2")))[0]
    ep4 = run_distributed_test(tiny_run, 4, args=(shards, steps, (*ROUTER, "parallel.expert_parallel=4")))[0]
    base_loss, base_counts = _drift(fsdp4, single)
    print(f"\nFSDPx4 vs one process, steps 1..{steps}: loss rel " + " ".join(f"{x:.1e}" for x in base_loss))
    print("  expert counts off by (share of total) " + " ".join(f"{x:.2%}" for x in base_counts))
    drifts = {}
    for name, ep, run in (("EP=2 x FSDP=2", 2, ep2), ("EP=4", 4, ep4)):
        assert run[0]["layout"]["expert_parallel"] == ep and run[0]["layout"]["world_size"] == 4
        assert run[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)
        assert run[0]["load"] == single[0]["load"]  # step 1: the same routing, exactly
        drifts[name] = _drift(run, single)
        print(f"{name} vs one process: loss rel " + " ".join(f"{x:.1e}" for x in drifts[name][0]))
        print("  expert counts off by (share of total) " + " ".join(f"{x:.2%}" for x in drifts[name][1]))
    # Through step 12 (the window the issue measured plain FSDP x4 in: 1.9e-4 and 0.8%) every layout stays
    # within 5e-4 of the loss and 2% of the expert counts. After it plain FSDP x4 itself leaves the one-process
    # run (a route flipped by rounding moves the sign-driven bias, which flips more routes; measured: 1.8e-2 of
    # the loss and 19% of the counts by step 20), and two such chaotic runs cross each other step by step: over
    # the 20 steps EP stays within the largest drift plain FSDP x4 shows (1.5x) and 2% of the counts above it.
    early = 12
    assert max(base_loss[:early]) <= 5e-4 and max(base_counts[:early]) <= 0.02
    for name, (loss, counts) in drifts.items():
        assert max(loss[:early]) <= 5e-4 and max(counts[:early]) <= 0.02, (name, loss, counts)
        assert max(loss) <= 1.5 * max(base_loss) + 1e-6, (name, loss)
        assert max(counts) <= max(base_counts) + 0.02, (name, counts)
    ac = run_distributed_test(
        tiny_run,
        4,
        args=(shards, steps, (*ROUTER, "parallel.expert_parallel=2", "train.activation_checkpointing=true")),
    )[0]
    assert [s["loss"] for s in ac] == [s["loss"] for s in ep2]
    assert [s["load"] for s in ac] == [s["load"] for s in ep2]

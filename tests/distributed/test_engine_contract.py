"""The engine contract (training/engines/base.py, docs/engines.md), checked for every engine and layout of
tests/engine_cases.py on in-process gloo ranks: the layout it reports agrees with its dims and with what
`validate` accepted; it starts from the same weights (digests) as one process and takes the same steps on
the same global batches; its state survives a round trip into a fresh engine; `discard` forgets gradients and
expert load; evaluation gives the one-process losses; a stop signal reaching one rank stops every rank after
the same step; and each layout it lacks is refused naming the key.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from engine_cases import CASES, REFUSED, EngineCase
from multirank import rank_info, run_distributed_test

from kmoe.configtree import ConfigError

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs/train/toy.yaml")
STEPS = 3  # steps compared with the reference before the round trip


def _config(case: EngineCase, shards: str, *more: str):
    from training.config import load_run_config

    base = [f"data.shards={shards}", "train.steps=20", "checkpoint.every=0", "train.eval_every=0"]
    return load_run_config(TOY, base + list(case.overrides) + list(more))


def _info():
    import torch.distributed as dist

    from training.parallel import DistInfo

    return rank_info() if dist.is_initialized() else DistInfo(0, 1, 0, torch.device("cpu"))


def _step(engine, batch, cfg) -> dict:
    from training.trainer import global_loss, micro_batches

    stats = engine.train_batch(micro_batches(batch, engine.dims, cfg.train.micro_batch_size))
    loss_sum, aux = global_loss(engine, stats)
    res = engine.step(cfg.train.lr)
    return {"loss": loss_sum / float(batch.loss_mask_GS.sum()), "aux": aux, "grad_norm": res.grad_norm,
            "load": res.expert_load_LE.tolist()}  # fmt: skip


def _rank0_state(engine) -> dict:
    """`state_dict` is complete on rank 0; the full state every rank loads, copied (as from a checkpoint:
    one process's state may alias the engine's live tensors)."""
    import copy

    import torch.distributed as dist

    state = [copy.deepcopy(engine.state_dict())]
    if dist.is_initialized():
        dist.broadcast_object_list(state, src=0)
    return state[0]


def contract_run(case: EngineCase, shards: str, run_dir: str) -> dict:
    """Everything the contract tests assert on, computed on one rank."""
    from training import evaluation
    from training.data import TrainData
    from training.engines import build_engine

    cfg, info = _config(case, shards), _info()
    data = TrainData(cfg)
    a = build_engine(cfg, info)
    a.build(cfg.train.seed)
    out: dict = {"dims": a.dims.sizes(), "holds_loss": a.dims.holds_loss, "layout": a.layout()}
    out["init"] = a.param_digests()
    out["steps"] = [_step(a, data.global_batch(i), cfg) for i in range(STEPS)]
    out["eval"] = evaluation.evaluate(a, data)
    b = build_engine(cfg, info)
    b.build(cfg.train.seed + 1)  # other weights, then the state of `a`
    b.load_state_dict(_rank0_state(a))
    out["a_saved"], out["b_loaded"] = a.param_digests(), b.param_digests()
    junk = data.global_batch(STEPS + 5)
    from training.trainer import micro_batches

    b.train_batch(micro_batches(junk, b.dims, cfg.train.micro_batch_size))
    b.discard()
    batch = data.global_batch(STEPS)
    out["a_next"], out["b_next"] = _step(a, batch, cfg), _step(b, batch, cfg)
    out["a_after"], out["b_after"] = a.param_digests(), b.param_digests()
    out["signal"] = _signal_run(case, shards, run_dir)
    return out


def _signal_run(case: EngineCase, shards: str, run_dir: str) -> dict:
    """A trainer whose last rank alone gets SIGUSR1 after step 2."""
    from training.trainer import Trainer

    cfg, info = _config(case, shards, "log.wandb=false"), _info()
    trainer = Trainer(cfg, Path(run_dir), info)
    apply = trainer.apply_batch

    def apply_and_signal(batch, t0=None):
        out = apply(batch, t0)
        if trainer.state.step == 2 and info.rank == info.world - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.apply_batch = apply_and_signal
    code = trainer.run("none")
    return {"exit": code, "step": trainer.state.step}


_RESULTS: dict[str, list[dict]] = {}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from training.toy_shards import write_toy_shards

    return str(write_toy_shards(tmp_path_factory.mktemp("toy"), n_docs=80))


def results(case: EngineCase, shards: str, tmp_root: Path) -> list[dict]:
    """Per-rank results of `contract_run` for `case` (computed once per session)."""
    if case.id not in _RESULTS:
        run_dir = str(tmp_root / case.id)
        if case.world == 1:
            _RESULTS[case.id] = [contract_run(case, shards, run_dir)]
        else:
            _RESULTS[case.id] = run_distributed_test(contract_run, case.world, args=(case, shards, run_dir))
    return _RESULTS[case.id]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(params=[pytest.param(c, marks=[pytest.mark.full] if c.full else []) for c in CASES],
                ids=[c.id for c in CASES])  # fmt: skip
def case(request) -> EngineCase:
    return request.param


@pytest.fixture
def got(case, shards, tmp_root) -> list[dict]:
    return results(case, shards, tmp_root)


@pytest.fixture
def ref(shards, tmp_root) -> dict:
    return results(CASES[0], shards, tmp_root)[0]


def test_layout_agrees_with_dims_and_validate(case, got):
    from training.dims import layout

    lay = got[0]["layout"]
    sizes = got[0]["dims"]
    assert lay == layout(
        _config(case, "unused"), case.world
    )  # what the dry run printed and validate accepted
    assert (lay["world_size"], lay["data_parallel"], lay["expert_parallel"]) == (
        sizes.world,
        sizes.dp,
        sizes.ep,
    )
    assert (lay["tensor_parallel"], lay["pipeline_parallel"], lay["context_parallel"]) == (
        sizes.tp,
        sizes.pp,
        sizes.cp,
    )
    assert any(r["holds_loss"] for r in got)


def test_starts_from_the_single_process_weights_and_takes_its_steps(case, got, ref):
    assert got[0]["init"] == ref["init"]  # digests do not depend on the layout
    for rank in got:  # every rank reports the same global loss
        assert [s["loss"] for s in rank["steps"]] == [s["loss"] for s in got[0]["steps"]]
    for mine, theirs in zip(got[0]["steps"], ref["steps"], strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=case.tolerance)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=100 * case.tolerance)
        assert mine["load"] == theirs["load"]  # expert counts of the whole global batch, globally reduced
    assert ref["steps"][-1]["loss"] < ref["steps"][0]["loss"]


def test_state_round_trip(got):
    assert got[0]["b_loaded"] == got[0]["a_saved"]
    assert got[0]["a_next"] == got[0]["b_next"]  # optimizer state came along: the next step is the same
    assert got[0]["a_after"] == got[0]["b_after"]


def test_discard_forgets_gradients_and_expert_load(got):
    # `b` trained on a junk batch and discarded it before the step both engines took: nothing of it remains
    # (its gradients would move the weights, its expert load the router bias, both in the digests).
    assert got[0]["a_after"] == got[0]["b_after"]
    assert got[0]["a_after"] != got[0]["a_saved"]


def test_evaluation_matches_single_process(case, got, ref):
    assert set(got[0]["eval"]) == set(ref["eval"]) and ref["eval"]
    for lang, r in ref["eval"].items():
        assert got[0]["eval"][lang]["tokens"] == r["tokens"]
        assert got[0]["eval"][lang]["loss"] == pytest.approx(r["loss"], rel=case.tolerance)


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(got):
    assert [r["signal"] for r in got] == [{"exit": 75, "step": 2}] * len(got)


@pytest.mark.parametrize(
    "engine,world,overrides,key",
    [(e, w, o, k) for e, cases in REFUSED.items() for w, o, k in cases],
    ids=[f"{e}-{k}" for e, cases in REFUSED.items() for _, _, k in cases],
)
def test_a_layout_the_engine_lacks_is_refused_naming_the_key(engine, world, overrides, key):
    from kmoe import configtree
    from training.config import RunConfig, validate
    from training.engines import build_engine
    from training.parallel import DistInfo

    raw = configtree.apply_overrides(configtree.read_yaml(TOY), [f"engine.name={engine}", *overrides])
    cfg = configtree.from_dict(RunConfig, raw)  # not validated yet
    with pytest.raises(ConfigError, match=key):
        validate(cfg, world_size=world)
    with pytest.raises(ConfigError, match=key):  # and the engine refuses it before any compute
        build_engine(cfg, DistInfo(0, world, 0, torch.device("cpu")))

"""Stability policies on the real toy model: a non-finite gradient skips the step, a loss spike is
skipped or rolled back to the last checkpoint with the offending batch never trained on; and the
ledger hooks see every step, checkpoint and event."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.config import load_run_config
from training.hooks import NullLedger
from training.parallel import DistInfo
from training.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/train/toy.yaml")


class RecordingLedger(NullLedger):
    """Records the calls of the ledger hook protocol (training/hooks.py) in order."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def genesis(self, **kw):
        self.calls.append(("genesis", kw))

    def step(self, step, **kw):
        self.calls.append(("step", dict(kw, step=step)))

    def checkpoint(self, step, path, **kw):
        self.calls.append(("checkpoint", dict(kw, step=step, path=path)))

    def event(self, kind, **kw):
        self.calls.append((kind, kw))

    def weights_load(self, path, model_root, purpose):
        self.calls.append(("weights_load", {"path": path, "model_root": model_root, "purpose": purpose}))

    def close(self, status="completed"):
        self.calls.append(("close", {"status": status}))

    def of(self, kind: str) -> list[dict]:
        return [kw for k, kw in self.calls if k == kind]


def trainer(shards: Path, run_dir: Path, *extra: str) -> tuple[Trainer, RecordingLedger]:
    cfg = load_run_config(CONFIG, [f"data.shards={shards}", "train.steps=12", "train.eval_every=0", *extra])
    ledger = RecordingLedger()
    tr = Trainer(cfg, run_dir, DistInfo(0, 1, 0, torch.device("cpu")), ledger=ledger)
    tr.setup("none")
    return tr, ledger


def once_at_step(tr: Trainer, step: int, fn):
    """A hook body that applies `fn` during the forward/backward of step `step` (1-based), once."""
    fired = []

    def hook(*args):
        if tr.state.step == step - 1 and not fired:
            if tr.engine.model.training:
                fired.append(True)
            return fn(*args)
        return None

    return hook, fired


def test_nonfinite_gradient_skips_the_step_and_training_goes_on(shards, tmp_path):
    tr, ledger = trainer(shards, tmp_path)
    w = tr.engine.model.embed.weight
    hook, _ = once_at_step(tr, 4, lambda g: g * float("nan"))
    w.register_hook(hook)
    before: dict[int, torch.Tensor] = {}

    def snapshot(module, args):
        before.setdefault(tr.state.step, w.detach().clone())

    tr.engine.model.layers[0].register_forward_pre_hook(snapshot)
    assert tr.loop() == 0
    skips = ledger.of("skip_step")
    assert [(s["step"], s["reason"]) for s in skips] == [(4, "nonfinite_grad")]
    assert torch.equal(before[3], before[4])  # step 4 changed nothing
    steps = ledger.of("step")  # a skipped step is a skip_step event instead of a step record
    assert [s["step"] for s in steps] == [1, 2, 3, *range(5, 13)]
    assert steps[3]["tokens"] == steps[2]["tokens"] + 8 * 32  # skipped tokens are not counted
    assert all(torch.isfinite(p).all() for p in tr.engine.model.parameters())


def test_spike_skip_policy(shards, tmp_path):
    tr, ledger = trainer(shards, tmp_path, "train.spike_threshold=1.5", "train.spike_policy=skip")
    hook, fired = once_at_step(tr, 8, lambda m, i, out: out * 40.0)
    tr.engine.model.norm.register_forward_hook(hook)  # logits scale with it
    assert tr.loop() == 0
    assert fired and [(s["step"], s["reason"]) for s in ledger.of("skip_step")] == [(8, "spike")]
    assert tr.state.skipped_batches == []  # skip policy: the batch was consumed, not replayed


def test_spike_rollback_restores_checkpoint_and_skips_the_batch(shards, tmp_path):
    tr, ledger = trainer(shards, tmp_path, "train.spike_threshold=1.5", "train.spike_policy=rollback",
                         "checkpoint.every=5")  # fmt: skip
    hook, fired = once_at_step(tr, 8, lambda m, i, out: out * 40.0)
    tr.engine.model.norm.register_forward_hook(hook)  # logits scale with it
    assert tr.loop() == 0
    (rb,) = ledger.of("rollback")
    assert (rb["spike_step"], rb["skipped_batch"], rb["step"]) == (8, 7, 5)
    assert rb["checkpoint"] == "checkpoints/step-00000005"
    ck5 = next(c for c in ledger.of("checkpoint") if c["step"] == 5)
    assert rb["model_root"] == ck5["roots"]["model"]
    assert ledger.of("weights_load")[0]["purpose"] == "rollback"
    assert tr.state.skipped_batches == [7]
    steps = ledger.of("step")
    # steps 6, 7 replayed from the checkpoint on the same batches; step 8 onwards never sees batch 7
    assert [s["batch"] for s in steps] == [0, 1, 2, 3, 4, 5, 6, 5, 6, 8, 9, 10, 11, 12]
    assert [s["step"] for s in steps][-7:] == [6, 7, 8, 9, 10, 11, 12]
    final = json.loads((tmp_path / "checkpoints/step-00000012/trainer_state.json").read_text())
    assert final["trainer"]["skipped_batches"] == [7]


def test_ledger_hooks_receive_genesis_steps_checkpoints(shards, tmp_path):
    tr, ledger = trainer(shards, tmp_path, "checkpoint.every=6")
    assert tr.loop() == 0
    (gen,) = ledger.of("genesis")
    assert gen["seed"] == 1234 and len(gen["init_state"]) == len(tr.engine.model.state_dict())
    assert gen["data_manifest_root"] == json.loads((shards / "manifest.json").read_text())["root_hash"]
    steps = ledger.of("step")
    assert [s["step"] for s in steps] == list(range(1, 13))
    assert all(len(s["sample_indices"]) == 8 and len(s["batch_hash"]) == 64 for s in steps)
    assert len({s["batch_hash"] for s in steps}) == 12 and steps[-1]["tokens"] == 12 * 8 * 32
    assert sum(steps[0]["lang_tokens"].values()) == 8 * 32 and steps[0]["expert_load"].shape == (1, 4)
    cks = ledger.of("checkpoint")
    assert [(c["step"], c["tokens"]) for c in cks] == [(6, 6 * 256), (12, 12 * 256)]
    saved = json.loads((tmp_path / "checkpoints/step-00000012/digests.json").read_text())
    assert cks[-1]["roots"]["model"] == saved["merkle_root"]
    assert set(cks[-1]["roots"]) == {"model", "optimizer", "rng", "data"}
    assert ledger.calls[-1] == ("close", {"status": "completed"})


def test_collapsed_expert_raises_the_alarm(shards, tmp_path, caplog):
    tr, ledger = trainer(shards, tmp_path, "train.steps=5", "log.every=5")
    with torch.no_grad():  # expert 2 of the MoE layer can never win the top-k: it collapses
        tr.engine.model.layers[1].mlp.router.expert_bias[2] = -100.0
    with caplog.at_level("WARNING", logger="training.metrics"):
        assert tr.loop() == 0
    assert ledger.of("expert_dead") == [{"step": 5, "moe_layer": 0, "experts": [2]}]
    assert "expert collapse" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r.get("step") == 5 and "expert_layers" in r)["expert_dead_frac"] == 0.25

"""`kmoe train --dry-run` prints the resolved config, sizes and layout; bad configs fail before compute."""

from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from kmoe.cli import main
from training.config import EngineConfig

TINY = str(Path(__file__).resolve().parents[3] / "configs/train/tiny.yaml")


def test_dry_run_prints_config_sizes_layout(capsys):
    assert main(["train", "--config", TINY, "--dry-run", "--world-size", "2",
                 "--set", "parallel.strategy=fsdp"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "# resolved config" in out and "name: tiny" in out
    assert "active parameters" in out and "FLOPs/token training" in out
    assert '"strategy": "fsdp"' in out and '"grad_accumulation": 1' in out


def test_bad_batch_split_is_a_clear_error(capsys):
    code = main(["train", "--config", TINY, "--dry-run", "--world-size", "3"])
    assert code == 2
    assert "train.global_batch_size" in capsys.readouterr().err


REFUSED = [
    (
        ["engine.name=megatron", "model.balance_loss_coeff=0", "parallel.context_parallel=2"],
        "parallel.context_parallel: 2 is not implemented by the megatron engine",
    ),
    (["engine.name=megatron"], "model.balance_loss_coeff: megatron's seq_aux_loss"),
    (
        ["engine.name=deepspeed", "parallel.expert_parallel=2"],
        "parallel.expert_parallel: 2 is not implemented by the deepspeed engine",
    ),
    (
        ["engine.offload_optimizer=cpu"],
        "engine.offload_optimizer: 'cpu' is not implemented by the native engine; a setting of engine.name=deepspeed",
    ),
    (["engine.zero_stage=3"], "engine.zero_stage: 3 is not implemented by the native engine"),
    (["parallel.tensor_parallel=2"], "parallel.tensor_parallel: 2 is not implemented by the native engine"),
    (
        ["parallel.pipeline_parallel=2"],
        "parallel.pipeline_parallel: 2 is not implemented by the native engine",
    ),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("sets, message", REFUSED, ids=[s[0][0] for s in REFUSED])
def test_what_the_engine_does_not_implement_is_refused_before_anything_is_written(
    tmp_path, capsys, sets, message, dry_run
):
    run = tmp_path / "runs" / "tiny"
    args = ["train", "--config", TINY, "--run-dir", str(run)] + [a for s in sets for a in ("--set", s)]
    assert main(args + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # no run dir, config, ledger or key


def test_missing_data_is_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "runs" / "tiny"
    args = ["train", "--config", TINY, "--run-dir", str(run), "--set", f"data.shards={tmp_path / 'none'}"]
    assert main(args) == 2
    assert "data.shards" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_the_capability_table_is_what_validate_checks():
    from training.engines.capabilities import CAPABILITIES, implemented_engines

    assert implemented_engines() == ["deepspeed", "megatron", "native"]
    assert set(CAPABILITIES) == set(
        get_args(get_type_hints(EngineConfig)["name"])
    )  # every engine has an entry

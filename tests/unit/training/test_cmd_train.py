"""`kmoe train --dry-run` prints the resolved config, sizes and layout; bad configs fail before compute."""

from pathlib import Path

from kmoe.cli import main

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

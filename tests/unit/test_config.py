"""Config errors name the key, before any compute; overrides and hashing behave."""

import pytest

from kmoe.configtree import ConfigError, dump_yaml
from training.config import config_hash, load_run_config, validate


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.hidden_sizee=10"], "model.hidden_sizee"),  # unknown key
        (["model.num_heads=four"], "model.num_heads"),  # wrong type
        (["model.qk_norm=3"], "model.qk_norm"),
        (["model.hidden_size=100", "model.num_heads=3"], "model.num_heads"),  # heads do not divide hidden
        (["model.num_heads=4", "model.num_kv_heads=3"], "model.num_kv_heads"),  # GQA groups
        (["model.num_experts=8", "model.num_experts_per_tok=9"], "model.num_experts_per_tok"),
        (["model.num_experts=8", "parallel.expert_parallel=3"], "parallel.expert_parallel"),
        (["model.router_score=relu"], "model.router_score"),
        (["data.seq_len=100000"], "data.seq_len"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
        (["train.warmup_steps=500", "train.steps=100"], "train.warmup_steps"),
        (["trian.steps=3"], "trian"),
        (["launch.nodes=0"], "launch.nodes"),
        (["launch.time=4h"], "launch.time"),
        (["launch.gpus_per_node=0"], "launch.procs_per_node"),  # CPU ranks: how many?
        (["launch.procs_per_node=4"], "launch.procs_per_node"),  # 4 ranks on 8 GPUs
        (["launch.time=60", "launch.signal_grace_s=3600"], "launch.signal_grace_s"),  # the warning at start
        (["launch.env.2GPU=1"], "launch.env.2GPU"),
        (["launch.gpus_per_node=0", "launch.procs_per_node=2", "train.precision=bf16"], "train.precision"),
        (["launch.rdzv_port=80"], "launch.rdzv_port"),
    ],
)
def test_bad_values_name_the_key(repo_root, overrides, key):
    with pytest.raises(ConfigError) as e:
        load_run_config(f"{repo_root}/configs/model/tiny.yaml", overrides)
    assert key in str(e.value)
    assert "tiny.yaml" in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = _write(tmp_path, "model:\n  hidden_size: 64\n  num_heads: 4\n  expertz: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*model\.expertz"):
        load_run_config(path)


def test_world_size_checks():
    cfg = load_run_config(None, ["train.global_batch_size=12", "train.micro_batch_size=2"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="data-parallel"):
        validate(cfg, world_size=4)


def test_include_overrides_and_hash(tmp_path, repo_root):
    path = _write(tmp_path, f"name: t\nmodel: {repo_root}/configs/model/tiny.yaml\ntrain:\n  lr: 3e-4\n")
    cfg = load_run_config(path, ["model.num_layers=2"])
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 256 and cfg.train.lr == 3e-4
    same = load_run_config(path, ["model.num_layers=2"])
    other = load_run_config(path, ["model.num_layers=3"])
    assert config_hash(cfg) == config_hash(same) != config_hash(other)
    # the dumped YAML reloads to the same config
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert config_hash(load_run_config(dumped)) == config_hash(cfg)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_run_config(None, ["model.hidden_size"])

"""The `kmoe` CLI as a user runs it."""

import subprocess
import sys


def _kmoe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kmoe.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_subcommands(repo_root):
    r = _kmoe("--help", cwd=repo_root)
    assert r.returncode == 0
    for cmd in ("model", "export"):
        assert cmd in r.stdout


def test_model_info_solar(repo_root):
    r = _kmoe("model", "info", "--config", "configs/model/solar100b.yaml", "--json", cwd=repo_root)
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert abs(info["total_params"] / 102.6e9 - 1) < 0.01
    assert abs(info["active_params"] / 12e9 - 1) < 0.01
    assert info["weight_bytes"]["int4"] * 4 == info["weight_bytes"]["bf16"]


def test_bad_override_is_one_clear_line(repo_root):
    r = _kmoe(
        "model", "info", "--config", "configs/model/tiny.yaml", "--set", "model.num_kv_heads=3", cwd=repo_root
    )
    assert r.returncode == 2
    assert "model.num_kv_heads" in r.stderr and "Traceback" not in r.stderr


def test_smoke_then_export_verify(repo_root, tmp_path):
    ck, hf = tmp_path / "ck", tmp_path / "hf"
    r = _kmoe("model", "smoke", "--config", "configs/model/tiny.yaml", "--out", str(ck), cwd=repo_root)
    assert r.returncode == 0, r.stderr
    # A smoke checkpoint belongs to no training run: its tokenizer is unknown, and export says how to go on.
    r = _kmoe("export", "hf", str(ck), str(hf), "--dtype", "float32", cwd=repo_root)
    assert r.returncode == 2 and "tokenizer is unknown" in r.stderr and "--no-tokenizer" in r.stderr, r.stderr
    assert not hf.exists()
    r = _kmoe(
        "export", "hf", str(ck), str(hf), "--dtype", "float32", "--verify", "--no-tokenizer", cwd=repo_root
    )
    assert r.returncode == 0, r.stderr
    assert "No tokenizer" in (hf / "README.md").read_text() and not (hf / "tokenizer.json").exists()
    diff = float(r.stdout.split("max |logit diff| vs kmoe = ")[1].split()[0])
    assert diff <= 1e-4

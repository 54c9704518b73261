"""The quantizers' input: an exported HF Glm4Moe directory (a kmoe checkpoint is exported first)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"
)  # fmt: skip
SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def is_kmoe_checkpoint(path: Path) -> bool:
    """A kmoe checkpoint: config.yaml with model.safetensors (whole) or model/ shard files (sharded)."""
    from model.checkpoint import MODEL_FILE, SHARD_DIR

    weights = (path / MODEL_FILE).is_file() or any((path / SHARD_DIR).glob("*.safetensors"))
    return (path / "config.yaml").is_file() and weights


def source_tokenizer(source: Path, tokenizer: str | Path | None) -> str | Path | None:
    """--tokenizer as given, or for a kmoe checkpoint its training run's tokenizer; for a checkpoint inside a run
    the tokenizer must be the one its ledger records (kmoe.run_tokenizer)."""
    if is_kmoe_checkpoint(source):
        from kmoe.run_tokenizer import checkpoint_tokenizer

        hint = "pass --tokenizer DIR (the tokenizer it was trained with)"
        return checkpoint_tokenizer(source, tokenizer, hint).path
    if tokenizer and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer.json")
    return tokenizer


def resolve_source(source: str | Path, work_dir: Path, tokenizer: str | Path | None = None) -> Path:
    """An HF dir for SOURCE: itself when it is one, else `kmoe export hf` of the checkpoint into work_dir."""
    src = Path(source)
    if not src.is_dir():
        raise ValueError(f"SOURCE {src}: no such directory (want a kmoe checkpoint or an HF export)")
    tokenizer = source_tokenizer(src, tokenizer)
    if (src / "config.json").is_file():
        if not tokenizer:
            return src
        # Never write into the user's source: link its files into a work dir and add the tokenizer there.
        view = work_dir / "source-hf"
        view.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file() and f.name not in TOKENIZER_FILES:
                (view / f.name).symlink_to(f.resolve())
        _copy_tokenizer(Path(tokenizer), view)
        return view
    if not is_kmoe_checkpoint(src):
        raise ValueError(f"SOURCE {src}: neither an HF dir (config.json) nor a kmoe checkpoint (config.yaml)")
    from model.export_hf import export_hf

    out = work_dir / "source-hf"
    export_hf(src, out, dtype="float32", tokenizer_dir=tokenizer)
    return out


def _copy_tokenizer(tok: Path, dst: Path) -> None:
    if not (tok / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {tok}: no tokenizer.json")
    for name in (*TOKENIZER_FILES, "kmoe_tokenizer.json"):
        if (tok / name).is_file():
            shutil.copy2(tok / name, dst / name)


def require_tokenizer(hf_dir: Path) -> None:
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
        raise ValueError(
            f"{hf_dir}: no tokenizer.json; quantized artifacts need our tokenizer beside the weights. "
            "Pass --tokenizer DIR (the tokenizer stage's output)"
        )


def shard_files(hf_dir: str | Path) -> list[str]:
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (d / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_state(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    d = Path(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for f in shard_files(d):
        state.update(load_file(str(d / f)))
    return state


def read_config(hf_dir: str | Path) -> dict:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    if cfg.get("model_type") != "glm4_moe":
        raise ValueError(f"{hf_dir}/config.json: model_type {cfg.get('model_type')!r}, expected 'glm4_moe'")
    return cfg


def copy_side_files(hf_dir: str | Path, out: Path) -> None:
    for name in SIDE_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copy2(Path(hf_dir) / name, out / name)


def copy_tokenizer_files(hf_dir: str | Path, out: Path) -> list[str]:
    """Give `out` exactly the tokenizer files of `hf_dir`, byte for byte: a re-save by `transformers` rewrites
    them (tokenizer.json re-serialised, tokenizer.model dropped, `is_local` flags added), so we copy instead
    and remove any tokenizer file the source does not have."""
    names = [n for n in TOKENIZER_FILES if (Path(hf_dir) / n).is_file()]
    for n in TOKENIZER_FILES:
        if n not in names:
            (out / n).unlink(missing_ok=True)
    for n in names:
        shutil.copy2(Path(hf_dir) / n, out / n)
    return names


def bytes_on_disk(path: str | Path) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

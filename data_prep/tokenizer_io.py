"""How the build gets its tokenizer: data_prep.tokenizer (issue 4) loads or trains one.

- `tokenizer.path: DIR`   -> load_tokenizer(DIR)
- `tokenizer.train: {...}` -> train_tokenizer(OUT/corpus, TokenizerConfig(**train), OUT/tokenizer) after the
  text stages (it reads OUT/corpus/kept), then load_tokenizer(OUT/tokenizer)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kmoe.configtree import ConfigError, from_dict


def _module():
    try:
        from data_prep import tokenizer
    except ImportError as e:  # the module is written under issue 4; say so instead of a bare ImportError
        raise ConfigError(
            f"data_prep.tokenizer is not available ({e}); it provides load_tokenizer/train_tokenizer (issue 4)"
        ) from e
    return tokenizer


def open_tokenizer(tok_dir: str | Path):
    return _module().load_tokenizer(Path(tok_dir))


def check_train_config(train_cfg: dict[str, Any]):
    """Parse and validate `tokenizer.train` (unknown keys, wrong types, bad values) before any stage runs."""
    mod = _module()
    cfg = from_dict(mod.TokenizerConfig, train_cfg, prefix="tokenizer.train")
    try:
        mod.validate_config(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("tokenizer.", "tokenizer.train.", 1)) from None
    return cfg


def train(out_dir: Path, train_cfg: dict[str, Any]) -> Path:
    mod = _module()
    cfg = check_train_config(train_cfg)
    return Path(mod.train_tokenizer(Path(out_dir) / "corpus", cfg, Path(out_dir) / "tokenizer"))


def describe(tok, path: str) -> dict:
    """The tokenizer's identity as recorded in manifest.json."""
    pad = getattr(tok, "pad_id", None)
    return {
        "digest": tok.digest,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "pad_id": int(pad) if pad is not None and pad >= 0 else int(tok.eos_id),
        "path": path,
    }

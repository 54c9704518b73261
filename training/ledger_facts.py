"""Facts the genesis record states about the code and the machine: git identity, source hash, versions."""

from __future__ import annotations

import platform
import socket
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from kmoe.hashing import named_merkle_root, sha256_file

# The packages whose source defines what a run computes; their .py/.yaml files are hashed.
SOURCE_PACKAGES = ("kmoe", "model", "training", "data_prep", "quantize", "launch")
VERSIONED = ("torch", "megatron-core", "deepspeed", "transformers", "safetensors", "numpy", "cryptography")


def source_root() -> Path:
    import kmoe

    return Path(kmoe.__file__).resolve().parent.parent


def source_digests(root: str | Path | None = None) -> dict[str, str]:
    """sha256 of every .py/.yaml file of the kmoe packages as installed, by path relative to `root`."""
    root = Path(root) if root else source_root()
    out = {}
    for pkg in SOURCE_PACKAGES:
        base = root / pkg
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
                out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def code_identity(root: str | Path | None = None) -> dict[str, Any]:
    """Git commit and dirty flag (None outside a git checkout) and the Merkle root of the source files."""
    root = Path(root) if root else source_root()
    digests = source_digests(root)
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git(root, "rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "source_root": named_merkle_root(digests),
        "source_files": len(digests),
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({platform.processor() or platform.machine()})"]


def environment(world_size: int = 1, hostnames: Sequence[str] | None = None) -> dict[str, Any]:
    from . import numerics

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in VERSIONED},
        "devices": devices(),
        "world_size": int(world_size),
        "hostnames": sorted(set(hostnames)) if hostnames else [socket.gethostname()],
        "numerics": numerics.capture(),  # what bit-exact replay depends on (training/numerics.py)
    }

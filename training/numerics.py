"""The numerical environment a run's bits depend on: recorded in the ledger's genesis, reproduced by replay.

fp32 training on CPU is bit-reproducible when the torch build, the kernel ISA torch dispatched to at start
(AVX2, AVX512, ...), the intra-op thread count (it decides how reductions are split), and the deterministic
settings are the same. `capture()` states them; `reproduce()` sets what a running process can still set (the
thread count, deterministic algorithms, matmul precision, oneDNN and cuDNN switches) and names what it cannot
(the torch build, the ISA, the device), so `kmoe audit replay` knows whether to expect identical bits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"  # read once when torch starts: lowers the ISA its kernels use
# What a process can set after start, as (key, getter, setter).
_SETTABLE: tuple[tuple[str, Any, Any], ...] = (
    ("threads", torch.get_num_threads, torch.set_num_threads),
    ("deterministic_algorithms", torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms),
    ("float32_matmul_precision", torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    ("mkldnn_enabled", lambda: torch.backends.mkldnn.enabled, lambda v: setattr(torch.backends.mkldnn, "enabled", v)),
)  # fmt: skip
_CUDA_SETTABLE: tuple[tuple[str, Any, Any], ...] = (
    ("cudnn_deterministic", lambda: torch.backends.cudnn.deterministic,
     lambda v: setattr(torch.backends.cudnn, "deterministic", v)),
    ("cudnn_benchmark", lambda: torch.backends.cudnn.benchmark, lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    ("cuda_matmul_tf32", lambda: torch.backends.cuda.matmul.allow_tf32,
     lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
)  # fmt: skip
# What a process cannot change: a difference here means float-order differences are to be expected.
FIXED = ("torch", "device", "cpu_capability", "mkl", "mkldnn", "cuda", "cudnn")


def capture() -> dict[str, Any]:
    """This process's numerical environment, as the genesis record's `environment.numerics` holds it."""
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }
    for key, get, _ in _SETTABLE + (_CUDA_SETTABLE if cuda else ()):
        out[key] = get()
    return out


@dataclass
class Reproduction:
    """What `reproduce` set to the recorded values, and what differs and could not be set."""

    set: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    restore: dict[str, Any] = field(default_factory=dict)  # key -> this process's value before

    @property
    def exact(self) -> bool:
        """True when every recorded fact now holds here (bit-identical results are expected)."""
        return not self.differs


def _settable() -> dict[str, tuple[Any, Any]]:
    cuda = torch.cuda.is_available()
    return {k: (g, s) for k, g, s in _SETTABLE + (_CUDA_SETTABLE if cuda else ())}


def reproduce(recorded: dict[str, Any] | None, threads: int | None = None) -> Reproduction:
    """Set this process to the `recorded` environment where it can; `threads` overrides the thread count.
    Call before any compute of the run (a thread count set later still applies, but set it first)."""
    rep = Reproduction()
    if not recorded:
        rep.differs.append("the genesis records no numerical environment (a run from before it did)")
        recorded = {}
    wanted = dict(recorded)
    if threads is not None:
        wanted["threads"] = threads
    for key, (get, put) in _settable().items():
        if key not in wanted or wanted[key] is None or get() == wanted[key]:
            continue
        before = get()
        try:
            put(wanted[key])
        except (RuntimeError, ValueError, TypeError) as e:
            rep.differs.append(f"{key} {wanted[key]!r} recorded, {before!r} here (cannot set: {e})")
            continue
        rep.restore[key] = before
        rep.set.append(f"{key} {wanted[key]!r} (was {before!r})")
    here = capture()
    for key in [*FIXED, *(k for k in _settable() if k in recorded)]:
        if key in recorded and recorded[key] != here.get(key):
            rep.differs.append(
                f"{key} {recorded[key]!r} recorded, {here.get(key)!r} here{_hint(key, recorded)}"
            )
    return rep


def _hint(key: str, recorded: dict[str, Any]) -> str:
    if key == "cpu_capability" and recorded.get("device") == "cpu":
        return f" (start the replay with {CAPABILITY_ENV}={str(recorded[key]).lower()} if this CPU has it)"
    return ""


def restore(rep: Reproduction) -> None:
    """Put back what `reproduce` changed."""
    settable = _settable()
    for key, value in rep.restore.items():
        settable[key][1](value)
    rep.restore.clear()


@contextmanager
def reproduced(recorded: dict[str, Any] | None, threads: int | None = None) -> Iterator[Reproduction]:
    rep = reproduce(recorded, threads)
    try:
        yield rep
    finally:
        restore(rep)

"""Run megatron-core on a CPU-only test machine: redirect its hard-coded CUDA calls to the CPU.

Test-only. megatron-core 0.16.1 creates buffers with `device="cuda"`, calls `torch.cuda.current_device()`,
CUDA RNG/streams/events and checks `param.type() == "torch.cuda.FloatTensor"` in places that have no CPU
path (/work/shared/MEGATRON_CPU.md lists them). `install()` swaps the `torch` name inside megatron's own
modules for a proxy that sends those calls to the CPU, and fixes the two helpers whose CPU branch is wrong.
Nothing outside megatron's modules sees the proxy; the only process-wide changes are `Tensor.cuda` (a no-op
for CPU tensors) and `Tensor.type()` (reports CPU float tensors the way megatron's dtype checks expect).

The redirect is written against megatron-core 0.16.1 exactly and refuses any other version: a new release
moves these call sites, and a silently partial redirect would fail in ways that look like model bugs.

The product never imports this module. Product code runs on CPU only when `megatron.core` carries the
marker this module sets (training/engines/megatron/runtime.py reads it).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types

import torch

PINNED_VERSION = "0.16.1"
MARKER = "__kmoe_cpu_redirect__"
_CPU = torch.device("cpu")
_REAL_TENSOR_TYPE = torch.Tensor.type
_REAL_TENSOR_CUDA = torch.Tensor.cuda

# Modules whose `torch` global is swapped. Importing them here also loads what they import.
_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel",
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.torch",
)


def _cpu_device(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return _CPU
    if isinstance(value, int) and not isinstance(value, bool):
        return _CPU  # megatron passes torch.cuda.current_device() (an index) as a device
    if isinstance(value, str) and value.startswith("cuda"):
        return _CPU
    return value


def _on_cpu(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    return wrapped


class _Stream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name in ("query",):
            return lambda *a, **k: True
        if name in ("record_event",):
            return lambda *a, **k: _Stream()
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CudaProxy(types.SimpleNamespace):
    """`torch.cuda` as megatron's modules see it."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cuda_proxy() -> _CudaProxy:
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None)
    return _CudaProxy(
        current_device=lambda: _CPU,
        device_count=lambda: 1,
        set_device=lambda *a, **k: None,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        Stream=_Stream,
        Event=_Stream,
        current_stream=lambda *a, **k: _Stream(),
        stream=lambda *a, **k: contextlib.nullcontext(),
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        random=types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state()),
        nvtx=nvtx,
    )


_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)  # fmt: skip


class _TorchProxy(types.ModuleType):
    """`torch` as megatron's modules see it: CUDA devices become the CPU, torch.cuda is redirected."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cuda_proxy()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    """megatron's helper converts split sizes to host lists only for CUDA tensors; do it for CPU ones."""
    if torch.is_tensor(tensor):
        tensor = tensor.detach().to(_CPU)
        return tensor.numpy() if as_numpy else tensor
    return tensor


def _tensor_type(self, *args, **kwargs):
    name = _REAL_TENSOR_TYPE(self, *args, **kwargs)
    if not args and not kwargs and self.device.type == "cpu" and name.startswith("torch."):
        return "torch.cuda." + name[len("torch.") :]
    return name


def _tensor_cuda(self, *args, **kwargs):
    return self if self.device.type == "cpu" else _REAL_TENSOR_CUDA(self, *args, **kwargs)


def _get_cuda_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cuda_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def check_version() -> str:
    from megatron.core import package_info

    if package_info.__version__ != PINNED_VERSION:
        raise RuntimeError(
            f"tests/megatron_cpu.py redirects megatron-core {PINNED_VERSION} only; found "
            f"{package_info.__version__}. Re-measure the CUDA call sites for that version first."
        )
    return package_info.__version__


def install() -> None:
    """Redirect megatron-core's CUDA calls to the CPU in this process (idempotent)."""
    check_version()
    import megatron.core as mcore

    if getattr(mcore, MARKER, None):
        return
    for name in _MODULES:
        importlib.import_module(name)
    proxy = _TorchProxy()
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "torch", None) is torch:
            mod.torch = proxy
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state
    for mod in (moe_utils, token_dispatcher):
        if hasattr(mod, "maybe_move_tensor_to_cpu"):
            mod.maybe_move_tensor_to_cpu = _maybe_move_tensor_to_cpu
    torch.Tensor.type = _tensor_type
    torch.Tensor.cuda = _tensor_cuda
    # megatron warns when the CPU RNG moves inside its "CUDA" RNG fork; here both are the CPU generator.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    setattr(mcore, MARKER, PINNED_VERSION)


def run_ranks(fn, world: int, *args) -> list:
    """`fn(*args)` on `world` fresh gloo ranks with the redirect installed (tests/multirank.py)."""
    from multirank import run_distributed_test

    return run_distributed_test(fn, world, args=args, setup=install)

"""Known third-party noise, silenced once per `kmoe` command and in every process it starts.

Each entry below says why its message does not matter to a kmoe user; anything not listed is shown as usual.
`install()` runs first in `kmoe.cli.main`:
  - Python warnings are filtered here and, through PYTHONWARNINGS, in child processes (torchrun ranks, data
    workers, the llama.cpp child), which otherwise print the same warning once each; known log records are
    dropped by a filter on their logger;
  - third-party progress bars are off when stderr is not a terminal: in a log file they are thousands of
    carriage-return redraws, not a story (set TQDM_DISABLE=0 / HF_HUB_DISABLE_PROGRESS_BARS=0 to keep them).
Libraries that log through loguru (llm-compressor) are routed into Python logging by `loguru_to_logging`, with
their known noise dropped, so kmoe's log format and `-v` apply to them too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (message prefix, category, why it does not matter). PYTHONWARNINGS matches a literal, case-insensitive
# prefix of the message, so a prefix here may not hold ':' or ','.
WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning,
     "megatron-core, printed once per process that imports it (every rank, every data worker); the datasets "
     "kmoe reads through it need neither. An engine that runs megatron-core's fused layers on GPUs should say "
     "once itself when TE/Apex are missing"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning,
     "megatron-core's local layer spec, which the megatron engine builds when TransformerEngine is absent "
     "(docs/megatron.md); its norms are the ones kmoe's model computes"),
    ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed", UserWarning,
     "megatron-core's optimizer probes `main_grad`/`grad` on every parameter while it builds its groups; "
     "megatron's DDP keeps gradients in `main_grad`, so the probe's miss is expected"),
    ("full scope is deprecated", UserWarning,
     "megatron-core's own TransformerConfig default (cuda_graph_scope), not a setting kmoe passes"),
    ("Attempting to save a model with offloaded modules", UserWarning,
     "transformers, when GPTQ saves: llm-compressor's sequential pipeline marks modules as offloaded to the CPU, "
     "where the whole model already is; no disk offload is involved"),
)  # fmt: skip

# Python logging records dropped: (logger name, message prefix, why).
LOG_DROP: tuple[tuple[str, str, str], ...] = (
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both",
     "torch.fx advice to library authors, reached through llm-compressor's GPTQ tracing; no kmoe code calls it"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes would fetch a CPU kernel from the Hugging Face Hub at run time (`kernels`); kmoe runs offline "
     "on bitsandbytes' own CPU path, which is what the eval table's tok/s measures"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "DeepSpeed's import-time accelerator guess when a library (transformers, accelerate) imports it in "
     "passing; kmoe picks devices through torch, not DeepSpeed's accelerator"),
)  # fmt: skip

# loguru messages (llm-compressor) dropped by `loguru_to_logging`: (regex, why).
LOGURU_DROP: tuple[tuple[str, str], ...] = (
    ("Detected an MoE model which has not been linearized",
     "kmoe hands llm-compressor the stock Glm4Moe model on purpose; its post-load linearization is the path "
     "that calibrates every expert (quantize/gptq.py)"),
    ("MoE is being linearized after loading",
     "the same linearization, reported a second time"),
)  # fmt: skip

# Library loggers whose INFO output is bookkeeping, not results.
LOGGER_LEVELS = {"megatron": logging.WARNING}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def pythonwarnings() -> str:
    """PYTHONWARNINGS for child processes: ours appended to whatever the user set."""
    ours = [f"ignore:{msg}:{cat.__name__}" for msg, cat, _ in WARNINGS]
    have = [x for x in os.environ.get("PYTHONWARNINGS", "").split(",") if x]
    return ",".join(have + [x for x in ours if x not in have])


def install(verbose: bool = False) -> None:
    for msg, cat, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(msg), category=cat)
    os.environ["PYTHONWARNINGS"] = pythonwarnings()
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ.get("TQDM_DISABLE") == "1":
        _tqdm_off()
    for name, prefix, _ in LOG_DROP:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in lg.filters):
            lg.addFilter(_DropPrefix(prefix))
    if not verbose:
        for name, level in LOGGER_LEVELS.items():
            logging.getLogger(name).setLevel(level)


def _tqdm_off() -> None:
    """TQDM_DISABLE only changes tqdm's default, and llm-compressor / compressed-tensors pass `disable=` explicitly:
    make it win over those too (every bar is a subclass of tqdm.std.tqdm)."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "kmoe_off", False):
        return

    def off(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    off.kmoe_off = True
    tqdm.std.tqdm.__init__ = off


def loguru_to_logging() -> None:
    """Send loguru records to Python logging under the emitting module's name: INFO and METRIC records (per-module
    bookkeeping of llm-compressor, which prints them on stdout) as DEBUG, each warning once, LOGURU_DROP never.
    Call after importing the library (llm-compressor resets loguru's handlers on import)."""
    from loguru import logger

    drop = re.compile("|".join(f"(?:{p})" for p, _ in LOGURU_DROP))
    seen: set[str] = set()

    def sink(message) -> None:
        rec = message.record
        level = rec["level"].no  # loguru's level numbers are logging's
        if rec["level"].name == "METRIC" or level < logging.WARNING:
            level = logging.DEBUG
        if drop.search(rec["message"]) or (level >= logging.WARNING and rec["message"] in seen):
            return
        seen.add(rec["message"])
        logging.getLogger(rec["name"] or "loguru").log(level, "%s", rec["message"])

    if "METRIC" not in logger._core.levels:  # defined by llm-compressor's configure_logger, skipped at import
        logger.level("METRIC", no=38)
    logger.remove()
    logger.enable("llmcompressor")
    logger.add(sink, level="DEBUG", format="{message}")


def quiet_import_llmcompressor():
    """`llmcompressor`, imported without its import-time console output, then routed by loguru_to_logging."""
    key = "LLM_COMPRESSOR_LOG_DISABLED"  # read by the configure_logger that runs on import
    before = os.environ.get(key)
    os.environ[key] = "true"
    try:
        import llmcompressor
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before
    loguru_to_logging()
    return llmcompressor

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
     "megatron-core, imported for its indexed datasets only; kmoe never runs its fused kernels"),
)  # fmt: skip

# Python logging records dropped: (logger name, message prefix, why).
LOG_DROP: tuple[tuple[str, str, str], ...] = (
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true for both",
     "torch.fx advice to library authors, reached through llm-compressor's GPTQ tracing; no kmoe code calls it"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes would fetch a CPU kernel from the Hugging Face Hub at run time (`kernels`); kmoe runs offline "
     "on bitsandbytes' own CPU path, which is what the eval table's tok/s measures"),
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
    for name, prefix, _ in LOG_DROP:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in lg.filters):
            lg.addFilter(_DropPrefix(prefix))
    if not verbose:
        for name, level in LOGGER_LEVELS.items():
            logging.getLogger(name).setLevel(level)


def loguru_to_logging() -> None:
    """Send loguru records (llm-compressor configures loguru to print INFO on stdout) to Python logging under
    the emitting module's name, minus LOGURU_DROP; call after importing the library."""
    from loguru import logger

    drop = re.compile("|".join(f"(?:{p})" for p, _ in LOGURU_DROP))
    seen: set[str] = set()

    def sink(message) -> None:
        rec = message.record
        if drop.search(rec["message"]) or rec["message"] in seen:
            return
        if rec["extra"].get("log_once"):  # llm-compressor's `logger.bind(log_once=True)`
            seen.add(rec["message"])
        # loguru's level numbers are logging's; llm-compressor's METRIC (38) is per-module GPTQ bookkeeping
        level = logging.DEBUG if rec["level"].name == "METRIC" else rec["level"].no
        logging.getLogger(rec["name"] or "loguru").log(level, "%s", rec["message"])

    logger.remove()
    logger.add(sink, level="DEBUG", format="{message}")

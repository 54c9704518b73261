"""How the stages of `kmoe data build` log: full traces in the task log files, no variable dumps, one line for
the user.

datatrove's task logger (`datatrove.utils.logging.add_task_logger`) adds its loguru sinks with loguru's defaults
(`backtrace=True, diagnose=True`), so an exception in a step is logged with the value of every local variable in
every frame -- document text included, so personal data would reach OUT/work/logs -- and printed to the console
as a long traceback. kmoe's executors swap in `task_logger` for the duration of each task:
  - the task's log file (OUT/work/logs/<stage>/logs/task_<rank>.log) keeps the full traceback, without values;
  - the console gets warnings, not exceptions: a user error (ValueError, ConfigError, FileNotFoundError) reaches
    `kmoe data build` as a StageError, which the CLI prints as one line naming the stage and the log file.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import datatrove.executor.base as dt_base
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from loguru import logger

_DATATROVE_TASK_LOGGER = dt_base.add_task_logger
FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


class StageError(ValueError):
    """A user error raised inside a data stage; the message names the stage and its log files."""


def task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's task logger (it opens the log file), with the sinks replaced as described above."""
    logfile = _DATATROVE_TASK_LOGGER(logging_dir, rank, local_rank, node_rank)
    logger.remove()
    logger.add(logfile, level="DEBUG", format=FORMAT, colorize=False, backtrace=False, diagnose=False)
    logger.add(
        sys.stderr, level="WARNING", format=FORMAT, backtrace=False, diagnose=False,
        filter=lambda record: record["exception"] is None,
    )  # fmt: skip
    return logfile


@contextlib.contextmanager
def _kmoe_task_logger():
    dt_base.add_task_logger = task_logger  # _run_for_rank looks the name up in its module at call time
    try:
        yield
    finally:
        dt_base.add_task_logger = _DATATROVE_TASK_LOGGER


class QuietLocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor whose tasks log to their files only (datatrove prints local_rank 0 at INFO)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with _kmoe_task_logger():
            return super()._run_for_rank(rank, local_rank=1, node_rank=node_rank)


class KmoeSlurmExecutor(SlurmPipelineExecutor):
    """SlurmPipelineExecutor whose tasks log as above (the job unpickles this class and runs its tasks)."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with _kmoe_task_logger():
            return super()._run_for_rank(rank, local_rank=local_rank, node_rank=node_rank)

    def launch_merge_stats(self):
        """No merge job: kmoe's finalize stage merges its own counters (stats.json), and datatrove's merge job
        asks for a fixed 1 GB per CPU that a cluster without memory accounting may refuse."""


def quiet_console() -> None:
    """datatrove logs every task's pipeline and stats to the console at INFO; keep its warnings there, without
    variable dumps (its per-task logs still go to OUT/work/logs/<stage>/logs/, see task_logger)."""
    import datatrove.utils.logging as dt_logging

    def setup_default_logger() -> None:
        logger.remove()
        logger.add(sys.stderr, level="WARNING", backtrace=False, diagnose=False)

    dt_logging.setup_default_logger = setup_default_logger  # datatrove calls it again after every task
    setup_default_logger()


def run_stage(name: str, executor, logs: Path) -> None:
    """Run one stage; a user error inside it becomes one StageError line (the trace is in the log files)."""
    try:
        executor.run()
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        raise StageError(f"stage {name}: {e} (full trace in {logs}/logs/)") from None

"""SIGTERM/SIGUSR1: finish the current step on every rank, checkpoint, exit with REQUEUE_EXIT_CODE.

The handler only sets a flag; the trainer reduces the flag over all ranks (max) at each step boundary,
so every rank stops after the same step even when the signal reached only some of them.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later". A launcher (SLURM script, launch/) reads it as
# "a checkpoint was written on request, requeue me"; 0 means finished, anything else a failure.
REQUEUE_EXIT_CODE = 75
# Written into the run directory beside the checkpoint; removed when a run starts. Under torchrun (whose
# own exit code is 1 whenever a worker exits non-zero) this file is the launcher's "requeue me".
REQUEUE_MARKER = "requeue.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers; `requested` turns true when a stop signal arrived at this process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

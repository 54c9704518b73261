"""User-facing output of CLI commands (library code logs; commands print results here)."""

from __future__ import annotations

import sys


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()

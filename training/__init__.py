"""kmoe training: the run config, the trainer loop, engines, checkpoints, the ledger and audit tools."""

from .config import RunConfig, load_run_config, validate

__all__ = ["RunConfig", "load_run_config", "validate"]

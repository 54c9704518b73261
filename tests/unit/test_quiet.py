"""Known third-party noise is silenced in the command and in the processes it starts; other output is not."""

import logging
import os
import subprocess
import sys

from kmoe import quiet

# warns 'Transformer Engine and Apex are not installed' on import
TE_IMPORT = "import megatron.core.optimizer"


def _stderr_of(code: str, env: dict) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr


def test_child_processes_inherit_the_warning_filters(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning:foo")
    base = {**os.environ, "PYTHONWARNINGS": ""}
    assert "Transformer Engine and Apex are not installed" in _stderr_of(TE_IMPORT, base)  # the noise is real
    env = {**os.environ, "PYTHONWARNINGS": quiet.pythonwarnings()}
    assert env["PYTHONWARNINGS"].startswith("error::DeprecationWarning:foo,")  # the user's filters kept
    assert "Transformer Engine" not in _stderr_of(TE_IMPORT, env)
    assert "mine" in _stderr_of("import warnings; warnings.warn('mine')", env)  # other warnings still shown


def test_llm_compressor_moe_notice_is_dropped_and_the_rest_reaches_logging(caplog):
    from loguru import logger

    quiet.loguru_to_logging()
    try:
        with caplog.at_level(logging.DEBUG):
            logger.warning("Detected an MoE model which has not been linearized. First load model ...")
            logger.info("Compressing model")
            for _ in range(3):
                logger.warning("No accelerator available! Compressing model on CPU instead")
    finally:  # loguru is process-global: give the rest of the session its default handler back
        logger.remove()
        logger.add(sys.stderr)
    got = [(r.levelno, r.getMessage()) for r in caplog.records]
    # bookkeeping demoted to -v, a repeated warning shown once, the MoE notice never
    assert got == [(logging.DEBUG, "Compressing model"),
                   (logging.WARNING, "No accelerator available! Compressing model on CPU instead")]  # fmt: skip
    assert caplog.records[0].name == __name__


def test_known_log_records_are_dropped_others_kept(caplog):
    quiet.install()
    quiet.install()  # idempotent: one filter per entry
    lg = logging.getLogger("torch.fx._symbolic_trace")
    assert len(lg.filters) == 1
    with caplog.at_level(logging.WARNING):
        lg.warning("is_fx_tracing will return true for both fx.symbolic_trace and torch.export. ...")
        lg.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]

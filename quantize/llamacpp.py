"""GGUF files in llama.cpp (through `llama-cpp-python`), opened safely and evaluated in a child process.

llama.cpp's CPU "extra buffer types" (weights repacked for AMX or AVX kernels at load time) crash some builds on
CPUs with AMX (ggml-org/llama.cpp#20824: SIGSEGV or SIGILL decoding q8_0/q4_0). `Llama(...)` accepts no such
option (unknown keyword arguments are swallowed), so `open_llama` sets `use_extra_bufts` on the low-level model
parameters instead, off by default where /proc/cpuinfo lists AMX; llama.cpp's own CLI calls this `--no-repack`.

A crash in native code would take the whole Python process down, so `kmoe quantize eval` runs each GGUF file
in a child process (`python -m quantize.llamacpp JOB RESULT`): a crash becomes an error naming the signal, and
the evaluating process lives on to clean up its temporary files. A child that crashes with the extra buffer types
on is run once more with them off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
# The child's command line; JOB and RESULT file paths are appended.
WORKER = [sys.executable, "-m", "quantize.llamacpp"]


class BackendCrash(RuntimeError):
    """The llama.cpp child process died (a signal or a non-zero exit) instead of writing its result."""

    def __init__(self, message: str, signaled: bool):
        super().__init__(message)
        self.signaled = signaled  # killed by a signal (SIGSEGV, SIGILL, ...), not a Python error


def cpu_has_amx(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return any(f in flags for f in AMX_FLAGS)


def default_extra_bufts() -> bool:
    """llama.cpp's repacking buffer types: on unless the CPU has AMX (`KMOE_LLAMA_EXTRA_BUFTS=0/1` decides)."""
    env = os.environ.get("KMOE_LLAMA_EXTRA_BUFTS")
    return env != "0" if env in ("0", "1") else not cpu_has_amx()


@contextlib.contextmanager
def _model_params(**fields):
    """Make `Llama(...)` build its model with these low-level `llama_model_params` fields set."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def patched():
        p = default()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    C.llama_model_default_params = patched
    try:
        yield
    finally:
        C.llama_model_default_params = default


def open_llama(path: str | Path, n_ctx: int, extra_bufts: bool | None = None, **kwargs):
    """`llama_cpp.Llama` for a GGUF file, logits for every position, f32 KV cache, one thread by default."""
    from llama_cpp import GGML_TYPE_F32, Llama

    extra = default_extra_bufts() if extra_bufts is None else extra_bufts
    opts = dict(n_ctx=n_ctx, logits_all=True, n_threads=1, verbose=False, type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32, seed=0)  # fmt: skip
    with _model_params(use_extra_bufts=extra):
        return Llama(model_path=str(path), **{**opts, **kwargs})


class LlamaRunner:
    """Teacher-forced NLL and greedy generation in llama.cpp (f32 KV cache: differences come from weights)."""

    def __init__(self, path: Path, n_ctx: int, extra_bufts: bool | None = None):
        self.llm = open_llama(path, n_ctx, extra_bufts)

    def nll(self, seq: list[int]) -> tuple[float, int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(seq)
        logits = np.asarray(self.llm.scores[: len(seq) - 1], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        return float((logz - logits[np.arange(len(seq) - 1), seq[1:]]).sum()), len(seq) - 1

    def close(self) -> None:
        self.llm.close()

    def generate(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        out = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out


def evaluate_gguf(path: Path, seqs: dict[str, list[list[int]]], prompt: list[int], gen_tokens: int,
                  n_ctx: int) -> dict:  # fmt: skip
    """{"ppl", "tokens_per_s", "tokens", "note"?} for a GGUF file, computed in a child process.

    Raises ImportError when llama-cpp-python is missing and BackendCrash when the child dies."""
    job = {"path": str(path), "seqs": seqs, "prompt": prompt, "gen_tokens": gen_tokens, "n_ctx": n_ctx}
    extra = default_extra_bufts()
    try:
        return _run_child({**job, "extra_bufts": extra})
    except BackendCrash as e:
        if not (extra and e.signaled):
            raise
        log.warning("%s; retrying without llama.cpp's extra CPU buffer types", e)
        out = _run_child({**job, "extra_bufts": False})
        return {**out, "note": f"{e}; rerun with use_extra_bufts=False (llama.cpp --no-repack)"}


def _run_child(job: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="kmoe-eval-gguf-") as work:
        jf, rf = Path(work) / "job.json", Path(work) / "result.json"
        jf.write_text(json.dumps(job))
        # One OpenMP thread that sleeps when idle: llama.cpp runs n_threads=1 and must not spin against torch.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        r = subprocess.run([*WORKER, str(jf), str(rf)], env=env, capture_output=True, text=True)
        if r.returncode == 0 and rf.is_file():
            out = json.loads(rf.read_text())
            if "import_error" in out:
                raise ImportError(out["import_error"])
            return out
    name = Path(job["path"]).name
    tail = (r.stderr or r.stdout).strip()[-400:]
    if r.returncode < 0:
        sig = signal.Signals(-r.returncode).name
        raise BackendCrash(
            f"llama.cpp crashed ({sig}) on {name} (use_extra_bufts={job['extra_bufts']})", True
        )
    raise BackendCrash(f"llama.cpp child failed on {name} (exit {r.returncode}): {tail}", False)


def _child(job_file: str, result_file: str) -> None:
    from .evaluate import perplexity, tokens_per_s

    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        Path(result_file).write_text(json.dumps({"import_error": str(e)}))
        return
    job = json.loads(Path(job_file).read_text())
    runner = LlamaRunner(Path(job["path"]), job["n_ctx"], job["extra_bufts"])
    ppl = perplexity(runner, job["seqs"])
    speed, toks = tokens_per_s(runner, job["prompt"], job["gen_tokens"])
    runner.close()
    Path(result_file).write_text(json.dumps({"ppl": ppl, "tokens_per_s": speed, "tokens": toks}))


if __name__ == "__main__":
    _child(*sys.argv[1:3])

"""The llama.cpp child process: a real crash (SIGSEGV) becomes an error naming the signal, a crash with the extra
CPU buffer types on is retried with them off, and AMX CPUs get them off from the start."""

import signal
import sys

import pytest

from quantize import llamacpp
from quantize.llamacpp import BackendCrash, cpu_has_amx, evaluate_gguf

# A stand-in child with the real one's interface (JOB RESULT): it segfaults for real (a NULL read) while the
# job asks for llama.cpp's extra buffer types, and answers otherwise.
SEGFAULT_WITH_EXTRA_BUFTS = """
import ctypes, json, sys
job = json.load(open(sys.argv[1]))
if job["extra_bufts"]:
    ctypes.string_at(0)
json.dump({"ppl": {"ko": 2.0}, "tokens_per_s": 1.0, "tokens": job["prompt"]}, open(sys.argv[2], "w"))
"""
ALWAYS_SEGFAULT = "import ctypes; ctypes.string_at(0)"
JOB = dict(seqs={"ko": [[1, 2, 3]]}, prompt=[1, 2], gen_tokens=2, n_ctx=16)


def _worker(monkeypatch, code):
    monkeypatch.setattr(llamacpp, "WORKER", [sys.executable, "-c", code])


def test_amx_is_read_from_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert not cpu_has_amx(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_amx(info)
    assert not cpu_has_amx(tmp_path / "missing")
    monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", "0")
    assert llamacpp.default_extra_bufts() is False
    monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", "1")
    assert llamacpp.default_extra_bufts() is True


def test_crash_with_extra_bufts_is_retried_without_them(tmp_path, monkeypatch):
    _worker(monkeypatch, SEGFAULT_WITH_EXTRA_BUFTS)
    monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", "1")
    got = evaluate_gguf(tmp_path / "m.gguf", **JOB)
    assert got["ppl"] == {"ko": 2.0} and got["tokens"] == [1, 2]
    assert "SIGSEGV" in got["note"] and "use_extra_bufts=False" in got["note"]
    monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", "0")  # as on an AMX CPU: off from the start, no crash
    assert "note" not in evaluate_gguf(tmp_path / "m.gguf", **JOB)


def test_a_crash_is_an_error_naming_the_signal_and_leaves_no_files(tmp_path, monkeypatch):
    import tempfile

    _worker(monkeypatch, ALWAYS_SEGFAULT)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for extra in ("0", "1"):
        monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", extra)
        with pytest.raises(BackendCrash, match=f"crashed \\({signal.Signals.SIGSEGV.name}\\) on m.gguf"):
            evaluate_gguf(tmp_path / "m.gguf", **JOB)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_child_reports_its_stderr_and_is_not_retried(tmp_path, monkeypatch):
    log = tmp_path / "runs.txt"
    _worker(
        monkeypatch,
        f"import sys; open({str(log)!r}, 'a').write('x'); sys.exit('llama_model_load: bad magic')",
    )
    monkeypatch.setenv("KMOE_LLAMA_EXTRA_BUFTS", "1")
    with pytest.raises(BackendCrash, match="exit 1.*bad magic") as e:
        evaluate_gguf(tmp_path / "m.gguf", **JOB)
    assert not e.value.signaled and log.read_text() == "x"  # a Python error is not the AMX crash: no rerun


def test_missing_llama_cpp_is_an_import_error(tmp_path, monkeypatch):
    # The real child, in an interpreter where `import llama_cpp` fails (a None entry in sys.modules).
    code = "import sys; sys.modules['llama_cpp'] = None; from quantize.llamacpp import _child; _child(*sys.argv[1:3])"
    _worker(monkeypatch, code)
    with pytest.raises(ImportError, match="llama_cpp"):
        evaluate_gguf(tmp_path / "m.gguf", **JOB)

"""`kmoe audit verify` and `init-check` on a real run: the toy MoE trained by kmoe's trainer with its ledger,
checkpoints, a crash that leaves a torn line, and a resume.

Each tamper test edits a hard-linked copy of the run and expects exit 1 with a finding that names the record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from toy_runs import one_process, toy_config

from kmoe.cli import main
from kmoe.hashing import canonical_json, sha256_json
from training.ledger import SIG_DOMAIN, Ledger, default_key_path
from training.ledger_chain import LEDGER_FILE, read_lines
from training.trainer import Trainer

TORN = b'{"batch_hash":"ab12","kind":"st'


class Crash(Exception):
    """The process dies here."""


def crashed_and_resumed_run(run_dir: Path, shards: Path) -> Path:
    """Steps 1-5 with a checkpoint at 3, a crash leaving a torn line, a resume from step 3, steps 4-7 with a
    checkpoint at 6 (and the final one at 7)."""
    cfg = toy_config(shards, "train.seed=7", "train.steps=7", "checkpoint.every=3", "checkpoint.keep_last=5")
    first = Trainer(cfg, run_dir, one_process(), ledger=Ledger.open(run_dir))
    step = first.apply_batch

    def crash_after_step_5(batch, t0=None):
        out = step(batch, t0)
        if first.state.step == 5:
            raise Crash
        return out

    first.apply_batch = crash_after_step_5
    with pytest.raises(Crash):
        first.run("none")
    first.ledger._f.close()  # no end record, no final signature
    with open(run_dir / LEDGER_FILE, "ab") as f:
        f.write(TORN)  # torn mid-write
    second = Trainer(cfg, run_dir, one_process(), ledger=Ledger.open(run_dir))
    assert second.run(str(run_dir / "checkpoints/step-00000003")) == 0
    return run_dir


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return crashed_and_resumed_run(tmp_path_factory.mktemp("runs") / "r7", shards)


def clone(src: Path, tmp_path: Path) -> Path:
    """A copy of the run whose big files are hard links (replace, never edit them in place) plus its key."""
    dst = tmp_path / "runs" / src.name
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / LEDGER_FILE).unlink()
    shutil.copyfile(src / LEDGER_FILE, dst / LEDGER_FILE)
    pub = Path(str(default_key_path(src)) + ".pub")
    Path(str(default_key_path(dst)) + ".pub").parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pub, str(default_key_path(dst)) + ".pub")
    return dst


def records(run: Path) -> list[dict]:
    """The parsed records (the torn line the crash left is not one; write_records puts it back)."""
    return [ln.record for ln in read_lines(run / LEDGER_FILE) if ln.record is not None]


def write_records(run: Path, recs: list[dict]) -> None:
    lines = [
        (TORN + b"\n" if r.get("event") == "torn_tail" else b"") + canonical_json(r) + b"\n" for r in recs
    ]
    (run / LEDGER_FILE).write_bytes(b"".join(lines))


def rechain(recs: list[dict], key=None) -> list[dict]:
    """What a forger without the run's key can do: renumber, recompute every prev (and sign with `key`)."""
    prev = "0" * 64
    for i, r in enumerate(recs):
        r["seq"], r["prev"] = i, prev
        if r["kind"] == "signature" and key is not None:
            r["sig"] = key.sign(SIG_DOMAIN + prev.encode()).hex()
        prev = sha256_json(r)
    return recs


def verify(run: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["audit", "verify", str(run), *extra])
    return rc, capsys.readouterr().out


def first_seq(recs: list[dict], kind: str, **match) -> int:
    return next(r["seq"] for r in recs if r["kind"] == kind and all(r.get(k) == v for k, v in match.items()))


def test_untouched_run_passes_with_resume_and_recorded_torn_write(run_dir, capsys):
    rc, out = verify(run_dir, capsys)
    assert rc == 0, out
    assert "verify: OK" in out and "torn write of 31 bytes" in out and "matches the pinned key" in out
    recs = records(run_dir)
    events = [r["event"] for r in recs if r["kind"] == "event"]
    assert events == ["torn_tail", "resume", "weights_load", "end"]
    assert [r["step"] for r in recs if r["kind"] == "step"] == [1, 2, 3, 4, 5, 4, 5, 6, 7]


def test_edited_loss_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "step", step=2)
    recs[k]["loss"] = recs[k]["loss"] - 0.5
    write_records(run, recs)
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {k + 1} " in out and f"(seq {k}, line {k + 1})" in out, out


def test_edited_loss_with_recomputed_chain_fails_signature(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "step", step=2)
    recs[k]["loss"] = 1.0
    write_records(run, rechain(recs))
    rc, out = verify(run, capsys)
    sig = first_seq(recs, "signature")
    assert rc == 1 and f"seq {sig} " in out and "signature over the chain head does not verify" in out, out


def test_deleted_step_record_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "step", step=2)
    write_records(run, recs[:k] + recs[k + 1 :])
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {k} (line {k + 1}): record carries seq {k + 1}" in out, out


def test_swapped_records_are_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "step", step=2)
    recs[k], recs[k + 1] = recs[k + 1], recs[k]
    write_records(run, recs)
    rc, out = verify(run, capsys)
    assert rc == 1 and f"record carries seq {k + 1}, expected {k}" in out, out


def test_truncated_mid_line_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    data = (run / LEDGER_FILE).read_bytes()
    (run / LEDGER_FILE).write_bytes(data[: len(data) - 40])
    rc, out = verify(run, capsys)
    last = len(records(run_dir)) - 1
    assert rc == 1 and f"seq {last} (line {last + 2}): torn record" in out, out
    assert "not covered by any signature" in out


def test_ledger_cut_back_to_an_earlier_signature_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "checkpoint", step=3)
    write_records(run, recs[: k + 2])  # ends cleanly at the step-3 checkpoint's signature
    rc, out = verify(run, capsys)
    assert rc == 1 and "checkpoints/step-00000006: on disk but no checkpoint record names it" in out, out
    assert f"ends at seq {k + 1}" in out


def test_forged_appended_record_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    forged = dict(recs[-2], seq=len(recs), prev=sha256_json(recs[-1]), status="extended")
    write_records(run, recs + [forged])
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {len(recs)}..{len(recs)}: 1 record(s) after the last signature" in out, out
    sig = dict(recs[-1], seq=len(recs) + 1, prev=sha256_json(forged), sig="00" * 64)
    write_records(run, recs + [forged, sig])
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {len(recs) + 1} " in out and "does not verify" in out, out


def test_replaced_checkpoint_tensor_file_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    target = run / "checkpoints/step-00000006/model/shard-00000.safetensors"
    with safe_open(str(target), "pt") as f:
        meta = f.metadata()  # DCP's offsets: a well-formed shard file, only one tensor changed
    state = load_file(str(target))
    state["norm.weight"] = state["norm.weight"] + 1e-3
    target.unlink()
    save_file(state, str(target), metadata=meta)
    rc, out = verify(run, capsys)
    k = first_seq(records(run), "checkpoint", step=6)
    assert rc == 1 and f"seq {k} " in out, out
    assert "model/shard-00000.safetensors does not match its recorded sha256" in out, out


def test_resigned_with_a_different_key_is_found(run_dir, tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from training.ledger import public_hex
    from training.ledger_chain import key_id

    other = Ed25519PrivateKey.generate()
    run = clone(run_dir, tmp_path)
    recs = records(run)
    write_records(run, rechain(recs, key=other))  # genesis still names the run's key
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {first_seq(recs, 'signature')} " in out and "does not verify" in out, out
    recs[0]["public_key"], recs[0]["key_id"] = public_hex(other), key_id(public_hex(other))
    for r in recs:
        if r["kind"] == "signature":
            r["key_id"] = recs[0]["key_id"]
    write_records(run, rechain(recs, key=other))  # a complete, self-consistent rewrite under a new key
    rc, out = verify(run, capsys)
    assert rc == 1 and "seq 0 (line 1, genesis): genesis public key" in out and "re-signed" in out, out
    pin = str(default_key_path(run_dir)) + ".pub"
    Path(str(default_key_path(run)) + ".pub").unlink()
    rc, out = verify(run, capsys)  # nothing pinned: passes, and says the key is not pinned
    assert rc == 0 and "public key not pinned" in out, out
    rc, out = verify(run, capsys, "--pubkey", pin)
    assert rc == 1 and "not the pinned key" in out, out


def test_removed_torn_line_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    (run / LEDGER_FILE).write_bytes(b"".join(canonical_json(r) + b"\n" for r in recs))
    rc, out = verify(run, capsys)
    k = first_seq(recs, "event", event="torn_tail")
    assert rc == 1 and f"seq {k} (line {k + 1}, event torn_tail): records a torn line" in out, out


def test_resume_from_unrecorded_checkpoint_is_found(run_dir, tmp_path, capsys):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    k = first_seq(recs, "event", event="resume")
    recs[k]["checkpoint"] = "checkpoints/elsewhere"
    write_records(run, recs)
    rc, out = verify(run, capsys)
    assert rc == 1 and f"seq {k} (line" in out and "not a recorded checkpoint" in out, out


def test_init_check_passes_on_the_run(run_dir, capsys):
    assert main(["audit", "init-check", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "seed 7" in out and "init-check: OK" in out


@pytest.mark.parametrize("tamper", ["digest", "seed"])
def test_init_check_fails_on_altered_genesis(run_dir, tmp_path, capsys, tamper):
    run = clone(run_dir, tmp_path)
    recs = records(run)
    g = recs[0]
    if tamper == "digest":
        name = "layers.1.mlp.experts.up_proj"
        g["init"]["tensors"][name] = sha256_json(torch.zeros(1).tolist())
    else:
        g["seed"] = 8
    write_records(run, recs)
    assert main(["audit", "init-check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FINDING: seq 0 (genesis)" in out, out
    assert ("layers.1.mlp.experts.up_proj" in out) if tamper == "digest" else ("from seed 8" in out), out


def test_ledger_records_what_an_auditor_needs(run_dir):
    recs = records(run_dir)
    g = recs[0]
    assert g["config"]["train"]["seed"] == 7 and g["config_hash"] == sha256_json(g["config"])
    assert g["code"]["source_files"] > 10 and len(g["code"]["source_root"]) == 64
    assert g["environment"]["versions"]["torch"].startswith("2.13.0")
    step = next(r for r in recs if r["kind"] == "step")
    assert set(step) >= {"tokens", "loss", "grad_norm", "lr", "lang_tokens", "samples", "batch_hash"}
    assert len(step["expert_load"]["per_expert"]) == 4  # the toy model's experts
    ck = next(r for r in recs if r["kind"] == "checkpoint")
    assert set(ck["roots"]) == {"model", "optimizer", "rng", "data"}
    assert set(ck["files"]) >= {"model/shard-00000.safetensors", "digests.json", "config.yaml",
                                "optimizer/shard-00000.safetensors", "rng.safetensors"}  # fmt: skip
    digests = json.loads((run_dir / ck["path"] / "digests.json").read_text())
    assert digests["merkle_root"] == ck["roots"]["model"]


# ---------------------------------------------------------------- report in a real headless browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run([*cmd, page.as_uri()], capture_output=True, text=True, timeout=120, check=False)


def console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def test_report_is_self_contained_and_escapes_ledger_text(run_dir, tmp_path):
    from training.audit.report import write_report

    run = clone(run_dir, tmp_path)
    recs = records(run)
    evil = "</script><img src=x onerror=alert(1)>"
    write_records(run, recs + [dict(recs[-2], seq=len(recs), prev=sha256_json(recs[-1]), status=evil)])
    assert write_report(run, tmp_path / "r.html") is False
    html = (tmp_path / "r.html").read_text()
    assert evil not in html and "default-src 'none'" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html), "the report must not load anything"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: apt-get install -y chromium")
@pytest.mark.parametrize("case", ["verified", "tampered"])
def test_report_renders_in_headless_chromium(run_dir, tmp_path, repo_root, case):
    from training.audit.report import write_report

    run = run_dir
    if case == "tampered":
        run = clone(run_dir, tmp_path)
        recs = records(run)
        recs[3]["loss"] = 0.1
        write_records(run, recs)
    page = tmp_path / "report.html"
    assert main(["audit", "report", str(run), "--out", str(page)]) == 0
    assert write_report(run, page) is (case == "verified")
    res = chromium(page, tmp_path / "profile", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'data-rendered="ok"' in dom and "data-error" not in dom, dom[-2000:]
    assert not console_errors(res.stderr), console_errors(res.stderr)
    assert dom.count("<svg") >= 5 and dom.count("<polyline") >= 3  # 3 curves, languages, heatmap
    assert "Tokens per language" in dom and "step-00000006" in dom
    if case == "verified":
        assert "Verification passed" in dom and "torn_tail" in dom and "resume" in dom
    else:
        assert "Verification FAILED" in dom and "seq 4 (line 5" in dom
    artifacts = Path(repo_root) / ".cache" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / f"audit-report-{case}.png"
    shot.unlink(missing_ok=True)
    res = chromium(page, tmp_path / "profile", "--window-size=1280,4200", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The ledger writer: chain, keys, crash recovery, encodings (no model, no training)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch

from kmoe.hashing import sha256_bytes, sha256_json
from training.audit.verify import verify_run
from training.ledger import Ledger, LedgerError, compact_indices, default_key_path, expert_load_stats
from training.ledger_chain import GENESIS_PREV, LEDGER_FILE, read_lines, walk_chain

STATE = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.zeros(3)}


def new_ledger(run_dir, **kw) -> Ledger:
    led = Ledger.open(run_dir, **kw)
    led.genesis(config={"model": {}, "train": {"seed": 1}}, seed=1, init_state=STATE)
    return led


def step(led: Ledger, n: int, **kw) -> dict:
    return led.step(n, tokens=100 * n, loss=kw.pop("loss", 5.0 - n / 10), grad_norm=1.0, lr=1e-3, **kw)


def test_records_chain_and_close_signs(tmp_path):
    run = tmp_path / "runs" / "a"
    led = new_ledger(run)
    for n in (1, 2, 3):
        step(led, n)
    led.close()
    recs = [ln.record for ln in read_lines(run / LEDGER_FILE)]
    assert [r["kind"] for r in recs] == ["genesis", "step", "step", "step", "event", "signature"]
    assert recs[0]["prev"] == GENESIS_PREV and all(r["seq"] == i for i, r in enumerate(recs))
    assert all(recs[i + 1]["prev"] == sha256_json(recs[i]) for i in range(len(recs) - 1))
    assert recs[-1]["final"] is True and recs[0]["init"]["tensors"].keys() == {"w", "b"}
    assert verify_run(run).ok


def test_key_lives_outside_the_run_dir_named_by_its_id_with_private_permissions(tmp_path):
    run = tmp_path / "runs" / "a"
    led = new_ledger(run)
    key = led.key_path
    assert key == tmp_path / "runs" / ".keys" / f"{led.key_id}.ed25519" and key.is_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not any(p.suffix == ".ed25519" for p in run.rglob("*"))
    assert Path(f"{key}.pub").read_text().strip() == led.public_key
    # the run-name pin `kmoe audit verify` reads by default
    assert Path(f"{default_key_path(run)}.pub").read_text().strip() == led.public_key


def test_reopen_continues_the_chain_and_records_a_torn_tail(tmp_path):
    run = tmp_path / "a"
    led = new_ledger(run)
    step(led, 1)
    led._f.close()  # crash
    torn = b'{"kind":"step","lo'
    with open(run / LEDGER_FILE, "ab") as f:
        f.write(torn)
    led = Ledger.open(run)
    assert led.resumed and led.seq == 3  # genesis, step, torn_tail
    step(led, 2)
    led.close()
    lines = read_lines(run / LEDGER_FILE)
    assert lines[2].raw == torn  # kept in place, not removed or repaired
    ev = lines[3].record
    assert (
        ev["event"] == "torn_tail"
        and ev["torn_sha256"] == sha256_bytes(torn)
        and ev["torn_bytes"] == len(torn)
    )
    chain = walk_chain(lines)
    assert not chain.findings and len(chain.torn) == 1
    assert verify_run(run).ok


def test_a_broken_ledger_or_a_foreign_key_is_refused_on_reopen(tmp_path):
    run = tmp_path / "a"
    led = new_ledger(run)
    step(led, 1)
    led.close()
    lines = (run / LEDGER_FILE).read_bytes().splitlines(keepends=True)
    (run / LEDGER_FILE).write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    with pytest.raises(LedgerError, match="cannot continue a broken ledger: seq 1"):
        Ledger.open(run)
    other = tmp_path / "b"
    new_ledger(other).close()
    with pytest.raises(LedgerError, match="not the key named in the genesis"):
        Ledger.open(other, key_path=led.key_path)


def test_non_finite_values_and_compact_fields(tmp_path):
    led = new_ledger(tmp_path / "a")
    rec = step(
        led, 1, loss=float("nan"), sample_indices=[8, 9, 10, 11], expert_load=torch.tensor([[3.0, 1.0]])
    )
    assert rec["loss"] == "nan" and rec["samples"] == {"start": 8, "count": 4}
    assert compact_indices([3, 1]) == {"list": [3, 1]}
    assert expert_load_stats([[3, 1], [2, 2]]) == {"per_expert": [5, 3], "max_over_mean": [1.5, 1.0]}
    with pytest.raises(LedgerError, match="genesis must be the first record"):
        led.genesis(config={}, seed=1, init_state=STATE)
    with pytest.raises(LedgerError, match="does not exist"):
        led.checkpoint(1, tmp_path / "nowhere", tokens=100, roots={})


def test_checkpoint_records_file_digests_and_is_signed(tmp_path):
    run = tmp_path / "a"
    led = new_ledger(run)
    step(led, 1)
    ck = run / "checkpoints" / "step-1"
    ck.mkdir(parents=True)
    (ck / "x.bin").write_bytes(b"abc")
    rec = led.checkpoint(1, ck, tokens=100, roots={"model": "00"})
    assert rec["path"] == "checkpoints/step-1" and rec["files"] == {"x.bin": sha256_bytes(b"abc")}
    assert led.seq == rec["seq"] + 2  # followed by its signature
    led.close()
    v = verify_run(run)
    assert v.ok, v.findings
    (ck / "x.bin").write_bytes(b"abd")
    assert any("x.bin does not match" in f for f in verify_run(run).findings)


def test_periodic_signature_bounds_the_unsigned_tail_of_a_crash(tmp_path):
    run = tmp_path / "a"
    led = new_ledger(run)
    step(led, 1)
    sig = led.sign()
    step(led, 2)
    led._f.close()  # crash: step 2 is recorded but never signed
    v = verify_run(run)
    assert sig["kind"] == "signature" and sig["signed_seq"] == 1
    assert v.findings == [
        "seq 3..3: 1 record(s) after the last signature are not covered by any signature "
        "(appended without the run's key, or the run stopped without signing)"
    ]


def continues(run, **kw) -> Ledger:
    led = Ledger.open(run, **kw)
    assert led.resumed
    done = sum(ln.record["kind"] == "step" for ln in read_lines(run / LEDGER_FILE) if ln.record)
    step(led, done + 1)
    led.close()
    assert verify_run(run).ok
    return led


def test_a_renamed_or_copied_run_finds_its_key_by_id(tmp_path):
    runs = tmp_path / "runs"
    led = new_ledger(runs / "a")
    led.close()
    (runs / "a").rename(runs / "b")
    assert continues(runs / "b").key_path == led.key_path
    shutil.copytree(runs / "b", tmp_path / "project" / "b")
    with pytest.raises(LedgerError) as e:
        Ledger.open(tmp_path / "project" / "b")
    msg = str(e.value)  # one line: the key id, where it looked, how to pass it
    assert "\n" not in msg and led.key_id[:16] in msg and str(tmp_path / "project" / ".keys") in msg
    assert "--key FILE" in msg and "--key-dir DIR" in msg and "KMOE_KEY_DIR" in msg
    assert not (tmp_path / "project" / ".keys").exists()  # looking wrote nothing
    assert continues(tmp_path / "project" / "b", key_dir=runs / ".keys").key_path == led.key_path
    assert continues(tmp_path / "project" / "b", key_path=led.key_path).key_path == led.key_path


def test_key_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KMOE_KEY_DIR", str(tmp_path / "keys"))
    led = new_ledger(tmp_path / "runs" / "a")
    led.close()
    assert led.key_path == tmp_path / "keys" / f"{led.key_id}.ed25519"
    assert not (tmp_path / "runs" / ".keys").exists()  # nothing beside the run: the key dir is configured
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "elsewhere" / "z")
    assert continues(tmp_path / "elsewhere" / "z").key_path == led.key_path


def test_a_key_named_by_run_from_before_key_ids_is_still_found(tmp_path):
    runs = tmp_path / "runs"
    legacy = default_key_path(runs / "old")  # <runs>/.keys/old.ed25519, as runs were keyed before
    led = new_ledger(runs / "old", key_path=legacy)
    led.close()
    assert led.key_path == legacy
    assert continues(runs / "old").key_path == legacy
    (runs / "old").rename(runs / "renamed")
    assert continues(runs / "renamed").key_path == legacy

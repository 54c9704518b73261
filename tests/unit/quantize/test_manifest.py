"""Signed manifest: verify passes on an intact artifact and names the file when any byte changes."""

import json
import os

import pytest

from quantize.manifest import ArtifactError, load_or_create_key, sign_artifact, verify_artifact


def _artifact(tmp_path):
    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(300))
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


def test_every_file_is_covered_and_a_flipped_byte_is_named(tmp_path):
    d = _artifact(tmp_path)
    manifest = sign_artifact(d, {"kind": "hf-dir", "merkle_root": "ab" * 32}, "cd" * 32, None)
    assert set(manifest["files"]) == {
        "model.safetensors",
        "config.json",
        "sub/tokenizer.json",
        "signing_key.pub",
    }
    verify_artifact(d)
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        data = f.read_bytes()
        f.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        with pytest.raises(ArtifactError) as e:
            verify_artifact(d)
        rel = f.relative_to(d).as_posix()
        assert rel in str(e.value) or (
            rel in ("manifest.json", "manifest.sig") and "signature" in str(e.value)
        )
        f.write_bytes(data)
        verify_artifact(d)


def test_added_and_removed_files_fail(tmp_path):
    d = _artifact(tmp_path)
    sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, None)
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not in manifest.*extra.bin"):
        verify_artifact(d)
    (d / "extra.bin").unlink()
    (d / "config.json").unlink()
    with pytest.raises(ArtifactError, match="missing.*config.json"):
        verify_artifact(d)


def test_key_file_is_created_private_reused_and_pinned(tmp_path):
    key = tmp_path / "keys" / "signer.pem"
    d = _artifact(tmp_path)
    m1 = sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    m2 = sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, key)
    assert m1["signer"]["public_key_sha256"] == m2["signer"]["public_key_sha256"]
    pub = tmp_path / "pinned.pub"
    pub.write_bytes((d / "signing_key.pub").read_bytes())
    verify_artifact(d, pubkey=pub)
    other = tmp_path / "other"
    other.mkdir()
    sign_artifact(other, {"kind": "x", "merkle_root": "0" * 64}, None, None)  # ephemeral key
    with pytest.raises(ArtifactError, match="signature"):
        verify_artifact(other, pubkey=pub)


def test_resigned_manifest_with_swapped_key_is_caught_by_pinning(tmp_path):
    d = _artifact(tmp_path)
    sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, tmp_path / "k.pem")
    pinned = tmp_path / "k.pub"
    pinned.write_bytes((d / "signing_key.pub").read_bytes())
    (d / "config.json").write_text('{"a": 2}')
    sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, None)  # an attacker re-signs
    verify_artifact(d)  # self-consistent ...
    with pytest.raises(ArtifactError, match="another key"):
        verify_artifact(d, pubkey=pinned)  # ... but not by the expected signer
    assert json.loads((d / "manifest.json").read_text())["signer"]["key"] == "ephemeral"


def test_wrong_key_type_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    k = ec.generate_private_key(ec.SECP256R1())
    p = tmp_path / "ec.pem"
    p.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    with pytest.raises(ArtifactError, match="not an Ed25519"):
        load_or_create_key(p)


def test_ledger_head_is_found_from_a_run_checkpoint(tmp_path):
    from kmoe.hashing import canonical_json, sha256_json
    from quantize.manifest import ledger_head, source_digest

    run = tmp_path / "runs" / "r1"
    ck = run / "checkpoints" / "step-00000010"
    ck.mkdir(parents=True)
    assert ledger_head(ck) is None
    recs = [{"seq": 0, "kind": "genesis"}, {"seq": 1, "kind": "step", "prev": "x"}]
    (run / "ledger.jsonl").write_bytes(b"".join(canonical_json(r) + b"\n" for r in recs))
    assert ledger_head(ck) == sha256_json(recs[-1])
    with (run / "ledger.jsonl").open("ab") as f:
        f.write(b'{"seq": 2, "kin')  # a torn last line, as a crash leaves it
    assert ledger_head(ck) == sha256_json(recs[-1])
    (ck / "digests.json").write_text(json.dumps({"merkle_root": "ab" * 32, "tensors": {}}))
    assert source_digest(ck) == {"path": str(ck), "kind": "kmoe-checkpoint", "merkle_root": "ab" * 32}


def test_bad_requests_fail_before_any_model_is_loaded(tmp_path):
    from quantize.pipeline import QuantizeOptions, quantize

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.yaml").write_text("model: {}\n")
    (src / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="needs --calib"):
        quantize(src, tmp_path / "o", QuantizeOptions(method="gptq"))
    with pytest.raises(ValueError, match="its tokenizer is unknown; pass --tokenizer"):
        quantize(src, tmp_path / "o", QuantizeOptions(method="nf4"))
    with pytest.raises(ValueError, match="--mix"):
        quantize(src, tmp_path / "o", QuantizeOptions(method="gguf", mix="ko=x"))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        quantize(src, tmp_path / "o", QuantizeOptions(method="nf4"))
    with pytest.raises(ValueError, match="only replaces a previous kmoe artifact"):
        quantize(src, tmp_path / "o", QuantizeOptions(method="nf4", force=True))
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_ledger_style_hex_public_key_pins_the_signer(tmp_path):
    from cryptography.hazmat.primitives import serialization

    key_path = tmp_path / "run.ed25519"
    key, _ = load_or_create_key(key_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    (tmp_path / "run.ed25519.pub").write_text(raw + "\n")  # what training/ledger.py writes
    d = _artifact(tmp_path)
    m = sign_artifact(d, {"kind": "x", "merkle_root": "0" * 64}, None, key_path)
    assert m["signer"]["public_key_hex"] == raw
    verify_artifact(d, pubkey=tmp_path / "run.ed25519.pub")

"""`kmoe export hf` ships the tokenizer the checkpoint's run trained with, checked against the run's ledger."""

import json

import pytest
import yaml
from model_fixtures import random_checkpoint
from quantize_inputs import TINY_MODEL, build_sp_tokenizer

from kmoe.cli import main
from model import ModelConfig
from training.ledger import Ledger

EXPORTED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir as training leaves it: ledger genesis naming the tokenizer, a checkpoint whose config points at
    the shards dir holding that tokenizer."""
    from data_prep.tokenizer import tokenizer_digest

    root = tmp_path_factory.mktemp("run")
    tok = build_sp_tokenizer(root / "data" / "tokenizer")
    ckpt = random_checkpoint(
        root / "runs/r/checkpoints/step-00000010", ModelConfig(vocab_size=704, **TINY_MODEL), 1
    )
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    (ckpt / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "data": {"shards": str(root / "data"), "tokenizer": ""}})
    )
    led = Ledger.open(root / "runs/r", key_path=root / "keys/r.ed25519")
    led.genesis(config=cfg, seed=1, init_state={}, tokenizer_hash=tokenizer_digest(tok))
    led.close()
    return {"root": root, "tok": tok, "ckpt": ckpt}


def _export(run, out, *extra):
    return main(["export", "hf", str(run["ckpt"]), str(out), "--dtype", "float32", *map(str, extra)])


def test_export_finds_the_runs_tokenizer_by_default(run, tmp_path, capsys):
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    assert _export(run, out) == 0
    assert "with the run's tokenizer" in capsys.readouterr().out
    for name in EXPORTED:
        assert (out / name).read_bytes() == (run["tok"] / name).read_bytes(), name
    ours, hf = load_tokenizer(run["tok"]), AutoTokenizer.from_pretrained(str(out))
    text = "한국어 문장과 English, 日本語."
    assert hf(text)["input_ids"] == [ours.bos_id, *ours.encode(text)]
    card = (out / "README.md").read_text()
    assert (
        ours.digest in card and "genesis record" in card and str(run["root"] / "runs/r/ledger.jsonl") in card
    )


def test_a_changed_or_foreign_tokenizer_is_refused(run, tmp_path, capsys):
    other = build_sp_tokenizer(tmp_path / "other", vocab_size=650)
    assert _export(run, tmp_path / "a", "--tokenizer", other) == 2
    assert "not the tokenizer this checkpoint was trained with" in capsys.readouterr().err
    assert _export(run, tmp_path / "b", "--tokenizer", run["tok"]) == 0  # the right one, given explicitly
    cfg = run["tok"] / "tokenizer_config.json"
    original = cfg.read_bytes()
    try:
        cfg.write_text(json.dumps({**json.loads(original), "add_bos_token": False}))
        assert _export(run, tmp_path / "c") == 2
        err = capsys.readouterr().err
        assert "changed since training" in err and "--tokenizer DIR" in err
        assert not (tmp_path / "c").exists()  # refused before anything is written
    finally:
        cfg.write_bytes(original)


def test_unknown_tokenizer_needs_no_tokenizer_and_the_card_says_so(run, tmp_path, capsys):
    lone = tmp_path / "lone"
    random_checkpoint(lone, ModelConfig(vocab_size=704, **TINY_MODEL), 2)  # in no run: no ledger above it
    assert main(["export", "hf", str(lone), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer is unknown" in err and "--no-tokenizer" in err
    assert main(["export", "hf", str(lone), str(tmp_path / "y"), "--no-tokenizer"]) == 0
    assert not (tmp_path / "y" / "tokenizer.json").exists()
    assert "**No tokenizer.**" in (tmp_path / "y" / "README.md").read_text()


def test_quantize_from_a_run_checkpoint_uses_the_runs_tokenizer(run, tmp_path):
    import gguf
    import sentencepiece as spm

    out = tmp_path / "gguf"
    assert main(["quantize", "--method", "gguf", "--gguf-type", "f16", str(run["ckpt"]), str(out)]) == 0
    f = gguf.GGUFReader(str(out / "model-f16.gguf")).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
    sp = spm.SentencePieceProcessor(model_file=str(run["tok"] / "tokenizer.model"))
    assert tokens[: sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]

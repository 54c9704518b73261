"""End to end on a briefly trained tiny MoE: `kmoe quantize` for every method, stock loading, quality, sizes,
signatures, the starved-expert case and `kmoe quantize eval`."""

import json

import pytest
import torch
from quantize_inputs import build_all
from safetensors import safe_open

from kmoe.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("qtrained"), steps=60)


def _run(*argv):
    assert main(["quantize", *map(str, argv)]) == 0


@pytest.fixture(scope="module")
def gptq(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "a"
    # from the kmoe checkpoint (exported on the fly), tokenizer given separately
    _run("--method", "gptq", "--group-size", "32", "--calib", trained["text"], "--seq-len", "64",
         "--num-samples", "16", "--mix", "ko=0.4,en=0.2,ja=0.2,code=0.2", "--tokenizer", trained["tokenizer"],
         trained["ckpt"], out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def gptq_small(trained, tmp_path_factory):
    """The smallest GPTQ artifact: lm_head int4 too and the token embedding int8 per row."""
    out = tmp_path_factory.mktemp("gptq-small") / "a"
    _run("--method", "gptq", "--group-size", "32", "--calib", trained["text"], "--seq-len", "64",
         "--num-samples", "16", "--quantize-lm-head", "--quantize-embedding", trained["hf"], out)  # fmt: skip
    return out


def _eval_seqs(trained, n=6):
    from transformers import AutoTokenizer

    from quantize.samples import SAMPLE_TEXTS

    tok = AutoTokenizer.from_pretrained(str(trained["hf"]))
    return [
        tok(t, add_special_tokens=False)["input_ids"] for texts in SAMPLE_TEXTS.values() for t in texts[:n]
    ]


def test_gptq_loads_in_stock_transformers_and_tracks_logits(trained, gptq):
    from transformers import AutoModelForCausalLM

    q = json.loads((gptq / "quantization.json").read_text())
    p = q["params"]
    assert q["method"] == "gptq" and p["scheme"] == "W4A16" and p["group_size"] == 32
    assert set(p["routed_tokens_per_expert"]) == {"layers.1", "layers.2"}
    assert all(len(c) == 8 for c in p["routed_tokens_per_expert"].values())
    assert q["calibration"]["files"] and set(q["calibration"]["tokens"]) == {"ko", "en", "ja", "code"}
    assert q["calibration"]["mix"] == {"ko": 0.4, "en": 0.2, "ja": 0.2, "code": 0.2}
    assert q["source"]["kind"] == "kmoe-checkpoint"
    card = (gptq / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "| layers.2 | " + " | ".join(map(str, p["routed_tokens_per_expert"]["layers.2"])) + " |" in card
    with safe_open(str(gptq / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for layer in (1, 2):
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight_packed" in keys
        assert f"model.layers.{layer}.mlp.gate.weight" in keys  # router kept in high precision
    assert "lm_head.weight" in keys
    ref = AutoModelForCausalLM.from_pretrained(str(trained["hf"]), dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(gptq), dtype=torch.float32).eval()
    agree, rel = _logit_tracking(ref, model, _eval_seqs(trained))
    assert agree > 0.85 and rel < 0.15, (agree, rel)


def _logit_tracking(ref, model, seqs) -> tuple[float, float]:
    """Top-1 agreement and mean |logit error| / mean |logit| over `seqs`."""
    agree, err, mag = 0.0, 0.0, 0.0
    with torch.no_grad():
        for s in seqs:
            a, b = ref(torch.tensor([s])).logits, model(torch.tensor([s])).logits
            agree += (a.argmax(-1) == b.argmax(-1)).float().mean().item() / len(seqs)
            err, mag = err + (a - b).abs().mean().item(), mag + a.abs().mean().item()
    return agree, err / mag


def test_gptq_int8_embedding_loads_in_stock_transformers(trained, gptq_small):
    from transformers import AutoModelForCausalLM

    p = json.loads((gptq_small / "quantization.json").read_text())["params"]
    assert p["embedding"].startswith("int8") and "lm_head" not in p["ignored"]
    assert "token embedding: int8" in (gptq_small / "README.md").read_text()
    with safe_open(str(gptq_small / "model.safetensors"), "pt") as f:
        emb, scale = (
            f.get_tensor("model.embed_tokens.weight"),
            f.get_tensor("model.embed_tokens.weight_scale"),
        )
        assert "lm_head.weight_packed" in set(f.keys())
    assert emb.dtype == torch.int8 and scale.shape == (emb.shape[0], 1) and (scale > 0).all()
    ref = AutoModelForCausalLM.from_pretrained(str(trained["hf"]), dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(gptq_small), dtype=torch.float32).eval()
    seqs = _eval_seqs(trained)
    model(torch.tensor([seqs[0]]))  # compressed-tensors decompresses on the first forward
    w, w0 = model.get_input_embeddings().weight, ref.get_input_embeddings().weight
    assert ((w - w0).abs().amax(1) <= w0.abs().amax(1) / 127 + 1e-3).all()  # within one int8 step per row
    agree, rel = _logit_tracking(ref, model, seqs)
    assert agree > 0.8 and rel < 0.2, (agree, rel)


def test_gptq_starved_expert_fails_loudly_or_is_calibrated_on_all_tokens(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "starved"
    hf.mkdir()
    for f in trained["hf"].iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    state = load_file(str(hf / "model.safetensors"))
    state["model.layers.2.mlp.gate.e_score_correction_bias"][6] = -10.0  # the router never picks expert 6
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    common = ["--group-size", "32", "--calib", trained["text"], "--seq-len", "64", "--num-samples", "8"]
    with pytest.raises(ValueError, match="layers.2 expert 6"):
        main(["-v", "quantize", "--method", "gptq", *map(str, common), "--no-calibrate-all-experts",
              str(hf), str(tmp_path / "bad")])  # fmt: skip
    # The CLI turns the error into exit code 2 with one line; check that path too.
    assert main(["quantize", "--method", "gptq", *map(str, common), "--no-calibrate-all-experts",
                 str(hf), str(tmp_path / "bad2")]) == 2  # fmt: skip
    with pytest.raises(ValueError, match="fewer than 100000 token"):  # a minimum no expert reaches
        main(["-v", "quantize", "--method", "gptq", *map(str, common), "--no-calibrate-all-experts",
              "--min-expert-tokens", "100000", str(trained["hf"]), str(tmp_path / "bad3")])  # fmt: skip
    _run("--method", "gptq", *common, hf, tmp_path / "fixed")
    p = json.loads((tmp_path / "fixed" / "quantization.json").read_text())["params"]
    assert p["routed_tokens_per_expert"]["layers.2"][6] == 0
    assert p["starved_experts_fixed"] == ["layers.2 expert 6"]
    assert p["calibrated_tokens_per_expert"]["layers.2"][6] == p["calibration_tokens"] > 0
    with safe_open(str(tmp_path / "fixed" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.2.mlp.experts.6.up_proj.weight_packed")
        scale = f.get_tensor("model.layers.2.mlp.experts.6.up_proj.weight_scale")
    assert packed.dtype == torch.int32 and torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bnb_artifact_quantizes_experts_and_runs(trained, tmp_path, method):
    from quantize.bnb import WEIGHTS, load_bnb

    out = tmp_path / method
    _run("--method", method, trained["hf"], out)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: kmoe" in card and "cannot load" in card
    with safe_open(str(out / WEIGHTS), "pt") as f:
        dt = f.get_tensor("model.layers.1.mlp.experts.7.gate_proj.weight").dtype
    assert dt == (torch.uint8 if method == "nf4" else torch.int8)
    model = load_bnb(out)
    ids = _eval_seqs(trained, 1)[0][:8]
    out_ids = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] == 12
    _run("verify", out)


def test_sizes_signatures_and_eval_table(trained, gptq, gptq_small, tmp_path, capsys):
    from quantize.manifest import ArtifactError, verify_artifact

    arts = {}
    for m, extra in (("nf4", []), ("gguf", ["--gguf-type", "q4_0"]), ("gguf", ["--gguf-type", "q8_0"])):
        arts[m + "".join(extra[1:])] = out = tmp_path / (m + "".join(extra[1:]))
        _run("--method", m, *extra, trained["hf"], out)
    capsys.readouterr()
    rep = tmp_path / "eval.json"
    _run("eval", trained["hf"], gptq, gptq_small, *arts.values(), "--eval-data", trained["text"], "--seq-len", "64",
         "--max-seqs", "4", "--gen-tokens", "8", "--json", rep)  # fmt: skip
    table = capsys.readouterr().out
    assert "ppl ko" in table and "gguf q4_0" in table and "nf4" in table
    report = json.loads(rep.read_text())
    rows = {r["artifact"]: r for r in report["rows"]}
    assert rows["nf4"]["x_bf16"] <= 0.35 and rows["gguf q4_0"]["x_bf16"] <= 0.35
    assert rows["gptq W4A16 g32 +head +emb8"]["x_bf16"] <= 0.35 < rows["gptq W4A16 g32"]["x_bf16"]
    for r in report["rows"][1:]:
        if r["ppl"] is not None:  # gguf rows need llama-cpp-python
            assert set(r["ppl"]) == {"ko", "en", "ja", "code"}
            assert all(abs(v) < 25 for v in r["ppl_change_pct"].values()), r
    # verify: a flipped byte in any file of the GGUF artifact is named
    art = arts["ggufq4_0"]
    verify_artifact(art)
    for f in sorted(p for p in art.iterdir() if p.name not in ("manifest.json", "manifest.sig")):
        data = f.read_bytes()
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))
        with pytest.raises(ArtifactError, match=f.name):
            verify_artifact(art)
        assert main(["quantize", "verify", str(art)]) == 2
        f.write_bytes(data)
    verify_artifact(art)


def test_gptq_beats_plain_rounding(trained, gptq, tmp_path):
    """Same scheme and groups, no Hessian: round-to-nearest must track the original worse than GPTQ."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.gptq import IGNORE

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    rtn = AutoModelForCausalLM.from_pretrained(str(trained["hf"]), dtype=torch.float32)
    seqs = _eval_seqs(trained)
    oneshot(model=rtn, tokenizer=AutoTokenizer.from_pretrained(str(trained["hf"])),
            dataset=Dataset.from_dict({"input_ids": seqs[:2], "attention_mask": [[1] * len(s) for s in seqs[:2]]}),
            recipe=QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=IGNORE),
            num_calibration_samples=2, pipeline="sequential")  # fmt: skip
    rtn.save_pretrained(str(tmp_path / "rtn"), save_compressed=True)
    ref = AutoModelForCausalLM.from_pretrained(str(trained["hf"]), dtype=torch.float32).eval()
    err = {}
    for name, path in (("gptq", gptq), ("rtn", tmp_path / "rtn")):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            err[name] = sum(
                (ref(torch.tensor([s])).logits - m(torch.tensor([s])).logits).abs().mean().item()
                for s in seqs
            )
    assert err["gptq"] < err["rtn"], err


def test_model_without_shared_experts_with_tied_embeddings(trained, tmp_path):
    """Glm4Moe's zero-width shared expert and a tied lm_head: GPTQ skips the former, refuses to quantize the
    latter, and a failed run leaves no half-written artifact."""
    from quantize_inputs import TINY_MODEL
    from transformers import AutoModelForCausalLM

    from model import ModelConfig, MoETransformer, init_weights
    from model.checkpoint import model_state, save_model_dir

    cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": 720, "num_shared_experts": 0, "tie_embeddings": True,
                         "first_k_dense": 0})  # fmt: skip
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=9)
    save_model_dir(tmp_path / "ck", model_state(model), {"model": cfg.__dict__})
    common = ["--group-size", "32", "--calib", trained["text"], "--seq-len", "32", "--num-samples", "4",
              "--tokenizer", trained["tokenizer"]]  # fmt: skip
    for flag in ("--quantize-lm-head", "--quantize-embedding"):
        assert main(["quantize", "--method", "gptq", *map(str, common), flag,
                     str(tmp_path / "ck"), str(tmp_path / "bad")]) == 2  # fmt: skip
        assert not (tmp_path / "bad").exists()
    _run("--method", "gptq", *common, tmp_path / "ck", tmp_path / "gptq")
    p = json.loads((tmp_path / "gptq" / "quantization.json").read_text())["params"]
    assert set(p["routed_tokens_per_expert"]) == {"layers.0", "layers.1", "layers.2"}
    assert any("shared_experts.down_proj" in n for n in p["ignored"])
    m = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gptq"), dtype=torch.float32)
    assert m(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 720)


def test_gptq_calibrates_and_eval_reads_disjoint_halves_of_token_shards(trained, tmp_path):
    from quantize_inputs import write_token_shards

    from quantize import calibration as C
    from quantize.samples import SAMPLE_TEXTS

    shards = write_token_shards(trained["tokenizer"], tmp_path / "shards")
    calib, held = C.read_docs([shards], part="calib"), C.read_docs([shards])
    for lang in ("ko", "en", "ja", "code"):
        assert calib.ids[lang] and held.ids[lang]
        assert len(calib.ids[lang]) + len(held.ids[lang]) == 3 * len(SAMPLE_TEXTS[lang])  # a partition
    _run("--method", "gptq", "--group-size", "32", "--calib", shards, "--seq-len", "64", "--num-samples", "8",
         trained["hf"], tmp_path / "gptq")  # fmt: skip
    q = json.loads((tmp_path / "gptq" / "quantization.json").read_text())
    assert {p.rsplit("/", 1)[1] for p in q["calibration"]["files"]} == {
        f"{lang}.{ext}" for lang in ("ko", "en", "ja", "code") for ext in ("bin", "idx")
    }
    _run("eval", trained["hf"], tmp_path / "gptq", "--eval-data", shards, "--seq-len", "64", "--max-seqs", "2",
         "--gen-tokens", "4")  # fmt: skip


def _gguf_vocab(path):
    import gguf

    r = gguf.GGUFReader(str(path))

    def arr(key):
        f = r.fields[key]
        return [f.parts[i].tolist()[0] for i in f.data]

    f = r.fields["tokenizer.ggml.tokens"]
    keys = {"unk": "unknown", "bos": "bos", "eos": "eos", "pad": "padding"}
    ids = {k: r.fields[f"tokenizer.ggml.{g}_token_id"].parts[-1].tolist()[0]
           for k, g in keys.items() if f"tokenizer.ggml.{g}_token_id" in r.fields}  # fmt: skip
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
    return tokens, arr("tokenizer.ggml.scores"), arr("tokenizer.ggml.token_type"), ids


def test_every_artifact_carries_the_exact_tokenizer(trained, gptq, gptq_small, tmp_path):
    """GPTQ and bitsandbytes artifacts hold the source's tokenizer files byte for byte (and no other), with no
    local-path flags; GGUF embeds the sentencepiece model's vocabulary exactly."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    from quantize.hfdir import TOKENIZER_FILES
    from quantize.samples import SAMPLE_TEXTS

    src = trained["hf"]
    want = {n: (src / n).read_bytes() for n in TOKENIZER_FILES if (src / n).is_file()}
    assert "tokenizer.model" in want and "tokenizer.json" in want
    for m in ("nf4", "int8"):
        _run("--method", m, src, tmp_path / m)
    ref = AutoTokenizer.from_pretrained(str(src))
    texts = [t for ts in SAMPLE_TEXTS.values() for t in ts[:3]]
    for art in (gptq, gptq_small, tmp_path / "nf4", tmp_path / "int8"):
        got = {n: (art / n).read_bytes() for n in TOKENIZER_FILES if (art / n).is_file()}
        assert got == want, (art, sorted(got), sorted(want))
        cfg = json.loads(got["tokenizer_config.json"])
        assert "is_local" not in cfg and "local_files_only" not in cfg
        tok = AutoTokenizer.from_pretrained(str(art))
        assert [tok(t)["input_ids"] for t in texts] == [ref(t)["input_ids"] for t in texts]
    _run("--method", "gguf", "--gguf-type", "q8_0", src, tmp_path / "gguf")
    tokens, scores, types, ids = _gguf_vocab(tmp_path / "gguf" / "model-q8_0.gguf")
    proto = pb.ModelProto()
    proto.ParseFromString(want["tokenizer.model"])
    sp = spm.SentencePieceProcessor(model_proto=want["tokenizer.model"])
    n = sp.get_piece_size()
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert scores[:n] == [sp.get_score(i) for i in range(n)]
    assert types[:n] == [p.type for p in proto.pieces]  # sentencepiece and GGUF number piece types alike
    assert (
        set(types[n:]) <= {5} and len(tokens) == json.loads((src / "config.json").read_text())["vocab_size"]
    )
    assert ids == {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}


def test_eval_reports_a_crashed_backend_as_a_row_error_and_cleans_up(trained, tmp_path, monkeypatch, capsys):
    """llama.cpp dying (here a real SIGSEGV in the child that stands in for it) costs its row, not the run; the
    other rows are measured, the command exits 1 and no temporary directory is left behind."""
    import sys
    import tempfile

    from quantize import llamacpp

    _run("--method", "gguf", "--gguf-type", "q8_0", trained["hf"], tmp_path / "gguf")
    _run("--method", "int8", trained["hf"], tmp_path / "int8")
    monkeypatch.setattr(llamacpp, "WORKER", [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    capsys.readouterr()
    rep = tmp_path / "eval.json"
    # --tokenizer makes eval build a work dir (kmoe-eval-*) beside the GGUF child's own (kmoe-eval-gguf-*)
    assert main(["quantize", "eval", str(trained["hf"]), str(tmp_path / "gguf"), str(tmp_path / "int8"),
                 "--tokenizer", str(trained["tokenizer"]), "--eval-data", str(trained["text"]), "--seq-len", "32",
                 "--max-seqs", "2", "--gen-tokens", "4", "--json", str(rep)]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "could not be evaluated: gguf q8_0" in out and "error: llama.cpp crashed (SIGSEGV)" in out
    rows = {r["artifact"]: r for r in json.loads(rep.read_text())["rows"]}
    assert rows["gguf q8_0"]["ppl"] is None and "SIGSEGV" in rows["gguf q8_0"]["error"]
    assert set(rows["int8"]["ppl"]) == {"ko", "en", "ja", "code"}
    assert list((tmp_path / "tmp").iterdir()) == []

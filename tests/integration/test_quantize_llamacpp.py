"""GGUF in real llama.cpp (llama-cpp-python, built from source once and cached under .cache/wheels).

Slow the first time (the build takes 5-11 minutes on 2 cores), so it is `full`; it skips only when the build is
impossible here, and says why.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from quantize_inputs import build_all

from kmoe.cli import main
from quantize.evaluate import HFRunner
from quantize.llamacpp import open_llama
from quantize.samples import KOREAN_PROMPT, SAMPLE_TEXTS

SAMPLE = [texts[i] for texts in SAMPLE_TEXTS.values() for i in (0, 2)] + [
    "  두 칸  공백\t탭\n줄바꿈 123456 ＡＢＣ"
]

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.full


def llama_cpp():
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    r = subprocess.run(["make", "-C", str(REPO), "llama-cpp"], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(
            f"llama-cpp-python cannot be built here (make llama-cpp failed): {(r.stdout + r.stderr)[-600:]}"
        )
    import importlib

    importlib.invalidate_caches()
    return importlib.import_module("llama_cpp")


@pytest.mark.parametrize("tokenizer", ["sp", "bpe"])
def test_gguf_loads_in_llamacpp_and_greedy_matches_on_korean(tmp_path, tokenizer):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # torch and llama.cpp share this process
    llama_cpp()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = build_all(tmp_path / "m", steps=60, tokenizer=tokenizer)
    tok = AutoTokenizer.from_pretrained(str(t["hf"]))
    ids = tok(KOREAN_PROMPT)["input_ids"]  # with <s> when our tokenizer frames text with it
    hf = AutoModelForCausalLM.from_pretrained(str(t["hf"]), dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0].numpy()
    ref = HFRunner(hf).generate(
        ids, 8
    )  # plain greedy, no EOS stop: the rule the llama.cpp loop below follows
    got = {}
    for qt in ("f32", "f16", "q8_0", "q4_0", "q4_k_m"):  # q4_k_m: requantized by llama.cpp itself
        out = tmp_path / qt
        assert main(["quantize", "--method", "gguf", "--gguf-type", qt, str(t["hf"]), str(out)]) == 0
        llm = open_llama(out / f"model-{qt}.gguf", n_ctx=128)  # f32 KV; no AMX repacking on AMX CPUs
        # our tokenizer, embedded in the GGUF, tokenizes Korean exactly as the HF tokenizer does
        assert llm.tokenize(KOREAN_PROMPT.encode(), add_bos=True, special=False) == ids
        for text in SAMPLE:
            want = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == want, text
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)])
        gen = []
        for x in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            gen.append(int(x))
            if len(gen) == 8:
                break
        got[qt] = (float(np.abs(logits - ref_logits).max()), gen)
        llm.close()
    assert got["f32"][0] < 1e-3, got  # same model, same math: llama.cpp's GLM4_MOE == transformers' Glm4Moe
    assert got["f16"][1] == ref, got
    assert got["q8_0"][1][:2] == ref[:2] and got["q4_0"][1][:1] == ref[:1], got
    assert got["q4_k_m"][1][:1] == ref[:1], got
    sys.stdout.write(f"llama.cpp vs transformers: {got} ref {ref}\n")


VARIANTS = {
    "no_shared_expert": dict(num_shared_experts=0),
    "two_shared_experts": dict(num_shared_experts=2),
    # no QK-norm, all layers MoE, tied embeddings, unnormalised scaled weights, full rotary
    "plain": dict(num_shared_experts=0, qk_norm=False, first_k_dense=0, tie_embeddings=True, norm_topk_prob=False,
                  routed_scaling_factor=2.5, rotary_fraction=1.0),
}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_gguf_matches_transformers_for_every_export_option(tmp_path, variant):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    llama_cpp()
    from model_fixtures import random_checkpoint
    from quantize_inputs import TINY_MODEL, build_tokenizer
    from transformers import AutoModelForCausalLM

    from model import ModelConfig
    from model.export_hf import export_hf
    from quantize.gguf_export import export_gguf

    tok = build_tokenizer(tmp_path / "tok", 300)
    cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": 320, **VARIANTS[variant]})
    random_checkpoint(tmp_path / "ck", cfg, seed=5)
    export_hf(tmp_path / "ck", tmp_path / "hf", dtype="float32", tokenizer_dir=tok)
    export_gguf(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    ids = [5, 17, 33, 80, 120, 7, 9, 250, 3, 64]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(tmp_path / "m.gguf", n_ctx=64)
    llm.eval(ids)
    diff = float(np.abs(np.asarray(llm.scores[: len(ids)]) - ref).max())
    llm.close()
    assert diff < 1e-4, diff


def test_open_llama_sets_extra_bufts_on_the_model_params(tmp_path):
    llama_cpp()
    from quantize.gguf_export import export_gguf

    t = build_all(tmp_path / "m", steps=1, tokenizer="bpe")
    export_gguf(t["hf"], tmp_path / "m.gguf", "q4_0")
    for extra in (False, True):
        llm = open_llama(tmp_path / "m.gguf", n_ctx=32, extra_bufts=extra)
        assert llm.model_params.use_extra_bufts is extra  # what llama.cpp was given, not a swallowed kwarg
        llm.close()


def test_eval_fills_gguf_rows_in_a_child_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    import json
    import tempfile

    llama_cpp()
    t = build_all(tmp_path / "m", steps=30)
    for qt in ("f16", "q4_0"):
        assert (
            main(["quantize", "--method", "gguf", "--gguf-type", qt, str(t["hf"]), str(tmp_path / qt)]) == 0
        )
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rep = tmp_path / "eval.json"
    assert main(["quantize", "eval", str(t["hf"]), str(tmp_path / "f16"), str(tmp_path / "q4_0"),
                 "--tokenizer", str(t["tokenizer"]), "--eval-data", str(t["text"]), "--seq-len", "64",
                 "--max-seqs", "2", "--gen-tokens", "8", "--json", str(rep)]) == 0  # fmt: skip
    rows = {r["artifact"]: r for r in json.loads(rep.read_text())["rows"]}
    for label in ("gguf f16", "gguf q4_0"):
        row = rows[label]
        assert set(row["ppl"]) == {"ko", "en", "ja", "code"} and "error" not in row, row
        assert row["tokens_per_s"] > 0
    assert all(abs(v) < 0.5 for v in rows["gguf f16"]["ppl_change_pct"].values()), rows["gguf f16"]
    assert list((tmp_path / "tmp").iterdir()) == []

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
    lc = llama_cpp()
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
        llm = lc.Llama(model_path=str(out / f"model-{qt}.gguf"), n_ctx=128, logits_all=True, n_threads=1,
                       verbose=False, type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)  # fmt: skip
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
    lc = llama_cpp()
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
    llm = lc.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                   type_k=lc.GGML_TYPE_F32, type_v=lc.GGML_TYPE_F32)  # fmt: skip
    llm.eval(ids)
    diff = float(np.abs(np.asarray(llm.scores[: len(ids)]) - ref).max())
    llm.close()
    assert diff < 1e-4, diff

"""A small random-init Glm4Moe HF export with a real (tiny, self-trained) BPE tokenizer beside it."""

import pytest
import torch

from model import ModelConfig, MoETransformer, init_weights
from model.checkpoint import model_state, save_model_dir
from model.export_hf import export_hf
from quantize.devtools import TINY_MODEL, build_tokenizer


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtiny")
    tok = build_tokenizer(root / "tok", vocab_size=400)
    cfg = ModelConfig(vocab_size=416, **TINY_MODEL)  # larger than the tokenizer: GGUF pads the vocab
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed=3)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    save_model_dir(root / "ckpt", model_state(model), {"model": cfg.__dict__})
    export_hf(root / "ckpt", root / "hf", dtype="float32", tokenizer_dir=tok)
    return root / "hf"

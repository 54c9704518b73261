"""A small random-init Glm4Moe HF export with a real (tiny, self-trained) BPE tokenizer beside it."""

import pytest
from model_fixtures import random_checkpoint
from quantize_inputs import TINY_MODEL, build_tokenizer

from model import ModelConfig
from model.export_hf import export_hf


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtiny")
    tok = build_tokenizer(root / "tok", vocab_size=400)
    cfg = ModelConfig(vocab_size=416, **TINY_MODEL)  # larger than the tokenizer: GGUF pads the vocab
    random_checkpoint(root / "ckpt", cfg, seed=3)
    export_hf(root / "ckpt", root / "hf", dtype="float32", tokenizer_dir=tok)
    return root / "hf"

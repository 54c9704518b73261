"""Small real inputs for the quantization tests: a tokenizer trained on our own sample texts and a tiny MoE
briefly trained on them by kmoe's trainer, exported to HF.

    PYTHONPATH=tests python -m quantize_inputs OUT_DIR [--steps N]   # OUT_DIR/{tokenizer,run,hf,text.jsonl}
    PYTHONPATH=tests python -m quantize_inputs OUT_DIR --inputs-only  # OUT_DIR/{tokenizer,text.jsonl,shards/}
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from quantize.samples import SAMPLE_TEXTS

log = logging.getLogger(__name__)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")

TINY_MODEL = dict(
    hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=128, qk_norm=True, first_k_dense=1,
    dense_intermediate_size=128, num_experts=8, num_experts_per_tok=2, expert_intermediate_size=64,
    num_shared_experts=1, rotary_fraction=0.5,
)  # fmt: skip


def all_texts() -> list[str]:
    return [t for texts in SAMPLE_TEXTS.values() for t in texts]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on the sample texts and save it in the kmoe tokenizer-dir layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(all_texts() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out))
    ids = {k: tok.token_to_id(t) for k, t in zip(("unk", "bos", "eos", "pad"), SPECIALS)}
    (out / "kmoe_tokenizer.json").write_text(json.dumps({"special_ids": ids}, indent=1))
    return out


def build_sp_tokenizer(out_dir: str | Path, vocab_size: int = 700) -> Path:
    """The project's real sentencepiece tokenizer (data_prep.tokenizer), trained on the sample texts."""
    import gzip

    from data_prep.tokenizer import TokenizerConfig, train_tokenizer

    out = Path(out_dir)
    for lang, texts in SAMPLE_TEXTS.items():
        d = out.parent / f"{out.name}-corpus" / "kept" / lang
        d.mkdir(parents=True, exist_ok=True)
        with gzip.open(d / "000.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(40):  # vary the documents so BPE has pairs to count
                a, b = texts[i % len(texts)], texts[(i * 7 + 3) % len(texts)]
                doc = {"id": f"{lang}-{i}", "text": f"{a}\n{b} {i}", "lang": lang, "source": "kmoe-samples"}
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    cfg = TokenizerConfig(vocab_size=vocab_size, sample_chars=200_000, num_reserved=2)
    return train_tokenizer(out.parent / f"{out.name}-corpus", cfg, out)


def write_text_jsonl(path: str | Path) -> Path:
    """The sample texts as JSONL ({"text", "lang"} per line), the calibration/eval input format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for lang, texts in SAMPLE_TEXTS.items():
            for t in texts:
                f.write(json.dumps({"text": t, "lang": lang}, ensure_ascii=False) + "\n")
    return path


def write_token_shards(tokenizer_dir: str | Path, out_dir: str | Path, copies: int = 3) -> Path:
    """The sample texts as megatron `<lang>.bin/.idx` shards (int32 ids, </s> after each document), the
    layout `kmoe data build` writes; each text `copies` times so a shard has eval and calibration halves."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for lang, texts in SAMPLE_TEXTS.items():
        b = IndexedDatasetBuilder(str(out / f"{lang}.bin"), dtype=np.int32)
        for t in texts * copies:
            ids = tok(t)["input_ids"] + [tok.eos_token_id]
            b.add_document(torch.tensor(ids, dtype=torch.int32), [len(ids)])
        b.finalize(str(out / f"{lang}.idx"))
    return out


def train_tiny(
    tokenizer_dir: str | Path, out_dir: str | Path, steps: int = 60, seed: int = 0, **overrides
) -> Path:
    """The tiny MoE trained by `kmoe train`'s trainer on the sample texts (as token shards): enough for a model
    whose quantization error is measurable. Returns its final checkpoint directory."""
    from transformers import AutoTokenizer

    from kmoe.hashing import sha256_json
    from model import ModelConfig
    from training.config import CheckpointConfig, DataConfig, LogConfig, RunConfig, TrainConfig, validate
    from training.parallel import DistInfo
    from training.trainer import Trainer

    out = Path(out_dir)
    shards = write_token_shards(tokenizer_dir, out / "shards")
    (shards / "manifest.json").write_text(
        json.dumps({"root_hash": sha256_json(sorted(SAMPLE_TEXTS.items()))})
    )
    model = ModelConfig(**{**TINY_MODEL, "vocab_size": len(AutoTokenizer.from_pretrained(str(tokenizer_dir))),
                           **overrides})  # fmt: skip
    cfg = RunConfig(
        name="quantize-tiny", model=model,
        data=DataConfig(shards=str(shards), tokenizer=str(tokenizer_dir), seq_len=64, split="100,0,0"),
        train=TrainConfig(seed=seed, steps=steps, global_batch_size=8, micro_batch_size=8, lr=3e-3, min_lr=3e-3,
                          schedule="constant", warmup_steps=0, weight_decay=0.0, eval_every=0),
        checkpoint=CheckpointConfig(every=0, keep_last=1), log=LogConfig(every=20, wandb=False),
    )  # fmt: skip
    validate(cfg)
    assert Trainer(cfg, out / "run", DistInfo(0, 1, 0, torch.device("cpu"))).run() == 0
    return out / "run" / "checkpoints" / f"step-{steps:08d}"


def build_all(out_dir: str | Path, steps: int = 60, tokenizer: str = "sp") -> dict[str, Path]:
    """Tokenizer ("sp": the project's sentencepiece one; "bpe": byte-level BPE), trained checkpoint,
    bf16 HF export and a JSONL of the sample texts under `out_dir`."""
    from model.export_hf import export_hf

    out = Path(out_dir)
    build = {"sp": build_sp_tokenizer, "bpe": build_tokenizer}[tokenizer]
    tok = build(out / "tokenizer")
    ckpt = train_tiny(tok, out, steps=steps)
    hf = out / "hf"
    export_hf(ckpt, hf, dtype="bfloat16", tokenizer_dir=tok)
    return {"tokenizer": tok, "ckpt": ckpt, "hf": hf, "text": write_text_jsonl(out / "text.jsonl")}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m quantize_inputs", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--inputs-only", action="store_true", help="tokenizer and text only, no model")
    p.add_argument("--tokenizer", choices=["sp", "bpe"], default="sp")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    if a.inputs_only:
        build = {"sp": build_sp_tokenizer, "bpe": build_tokenizer}[a.tokenizer]
        made = {"tokenizer": build(out / "tokenizer"), "text": write_text_jsonl(out / "text.jsonl")}
        made["shards"] = write_token_shards(made["tokenizer"], out / "shards")
    else:
        made = build_all(out, steps=a.steps, tokenizer=a.tokenizer)
    for k, v in made.items():
        sys.stdout.write(f"{k}: {v}\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

"""Small real inputs for tests and the demo: a byte-level BPE tokenizer trained on our own sample texts and a
tiny MoE briefly trained on them, exported to HF. Not used by the quantizers themselves.

    python -m quantize.devtools OUT_DIR [--steps N]   # writes OUT_DIR/{tokenizer,ckpt,hf,text.jsonl}
    python -m quantize.devtools OUT_DIR --inputs-only  # only OUT_DIR/{tokenizer,text.jsonl,shards/}
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from .samples import SAMPLE_TEXTS

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
    tokenizer_dir: str | Path, ckpt_dir: str | Path, steps: int = 60, seed: int = 0, **overrides
) -> Path:
    """A plain AdamW loop over the sample texts: enough for a model whose quantization error is measurable."""
    from transformers import AutoTokenizer

    from model import ModelConfig, MoETransformer, init_weights
    from model.checkpoint import model_state, save_model_dir

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": len(tok), **overrides})
    torch.manual_seed(seed)
    model = MoETransformer(cfg)
    init_weights(model, cfg, seed)
    eos = tok.eos_token_id
    stream = [
        i for t in all_texts() for i in tok(t)["input_ids"] + [eos]
    ]  # <s> too when the tokenizer adds it
    data = torch.tensor(stream)
    seq, batch = 64, 8
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq + 1] for s in starts])
        out = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_router_bias()
        if step % 20 == 0 or step == steps - 1:
            log.info("tiny train step %d loss %.3f", step, loss.item())
    save_model_dir(ckpt_dir, model_state(model), {"model": cfg.__dict__})
    return Path(ckpt_dir)


def build_all(out_dir: str | Path, steps: int = 60, tokenizer: str = "sp") -> dict[str, Path]:
    """Tokenizer ("sp": the project's sentencepiece one; "bpe": byte-level BPE), trained checkpoint,
    bf16 HF export and a JSONL of the sample texts under `out_dir`."""
    from model.export_hf import export_hf

    out = Path(out_dir)
    build = {"sp": build_sp_tokenizer, "bpe": build_tokenizer}[tokenizer]
    tok = build(out / "tokenizer")
    ckpt = train_tiny(tok, out / "ckpt", steps=steps)
    hf = out / "hf"
    export_hf(ckpt, hf, dtype="bfloat16", tokenizer_dir=tok)
    return {"tokenizer": tok, "ckpt": ckpt, "hf": hf, "text": write_text_jsonl(out / "text.jsonl")}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m quantize.devtools", description=__doc__.split("\n")[0])
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

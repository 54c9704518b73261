"""Validation loss and perplexity per language on held-out documents.

The eval set of a language is its first `train.eval_batches x micro_batch_size` validation samples, the
same for any layout: micro-batch c goes to data-parallel rank c % dp_size, and a rank with nothing left
runs a zero-weight batch so sharded (FSDP, expert-parallel) forwards stay in step across ranks. The sums
come from the ranks that hold the loss (the last pipeline stage).
"""

from __future__ import annotations

import math
from typing import Any

from .data import TrainData, valid_samples
from .engines import Engine


def evaluate(engine: Engine, data: TrainData) -> dict[str, dict[str, float]]:
    t, dims = data.cfg.train, engine.dims
    rank, world = dims.dp_rank, dims.dp_size
    n = t.eval_batches * t.micro_batch_size
    results: dict[str, dict[str, float]] = {}
    for lang, ds in data.valid_sets().items():
        tokens, labels, mask = valid_samples(ds, n)
        mb = t.micro_batch_size
        chunks = [slice(i, i + mb) for i in range(0, tokens.shape[0], mb)]
        loss_sum = count = 0.0
        for start in range(0, len(chunks), world):
            c = start + rank
            weight = 1.0 if c < len(chunks) else 0.0
            sl = chunks[c] if c < len(chunks) else chunks[0]
            st = engine.evaluate(tokens[sl], labels[sl], mask[sl])
            loss_sum += weight * st.loss_sum
            count += weight * st.tokens
        mine = [loss_sum, count] if dims.holds_loss else [0.0, 0.0]
        loss_sum, count = engine.all_reduce(mine, group="world")
        loss = loss_sum / max(count, 1.0)
        results[lang] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
    return results


def summary(results: dict[str, dict[str, Any]]) -> str:
    return " | ".join(f"{lang} loss {r['loss']:.4f} ppl {r['ppl']:.2f}" for lang, r in results.items())

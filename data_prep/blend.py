"""Open a build's shards as megatron-core GPTDatasets with the manifest's language blend.

`build_gpt_datasets` is how training (training/data.py) opens shards; `gpt_datasets` opens a build OUT/ with
the manifest's blend (prefixes relative to OUT, weights).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.shards import MegatronTokenizerInfo


def build_gpt_datasets(
    blend: tuple[list[str], list[float] | None],
    tokenizer: MegatronTokenizerInfo,
    seq_len: int,
    num_samples: list[int],
    seed: int,
    split: str,
) -> list:
    """[train, valid, test] megatron BlendedDatasets over path prefixes: the one place kmoe configures GPTDataset.

    Plain packed documents: no position or attention-mask reset, loss on every token (EOD included).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=blend,
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,
        mmap_bin_files=True,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()


def gpt_datasets(
    out_dir: str | Path, seq_len: int, num_samples: list[int], seed: int = 1234, split: str = "98,1,1"
) -> list:
    """[train, valid, test] BlendedDatasets (None where a split gets no samples) over OUT/shards/*."""
    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    info = MegatronTokenizerInfo(
        tok["vocab_size"], tok["eos_id"], tok.get("pad_id", tok["eos_id"]), tok["digest"]
    )
    prefixes = [str(out / p) for p in manifest["blend"]["prefixes"]]
    return build_gpt_datasets(
        (prefixes, manifest["blend"]["weights"]), info, seq_len, num_samples, seed, split
    )

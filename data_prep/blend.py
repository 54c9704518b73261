"""Open a build's shards as megatron-core GPTDatasets with the manifest's language blend.

The reference for how training reads OUT/: manifest["blend"] gives prefixes (relative to OUT) and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.shards import MegatronTokenizerInfo


def gpt_datasets(
    out_dir: str | Path, seq_len: int, num_samples: list[int], seed: int = 1234, split: str = "98,1,1"
) -> list:
    """[train, valid, test] BlendedDatasets (None where a split gets no samples) over OUT/shards/*."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    out = Path(out_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    tok = manifest["tokenizer"]
    info = MegatronTokenizerInfo(
        tok["vocab_size"], tok["eos_id"], tok.get("pad_id", tok["eos_id"]), tok["digest"]
    )
    prefixes = [str(out / p) for p in manifest["blend"]["prefixes"]]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, manifest["blend"]["weights"]),
        split=split,
        tokenizer=info,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=None,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, config).build()

"""The stage graph: which steps run where, and the same graph under the SLURM executor (built, not submitted)."""

from pathlib import Path

from data_prep.config import DataConfig
from data_prep.pipeline import _executor, config_hash, stages
from kmoe.configtree import from_dict


def _cfg(**executor) -> DataConfig:
    return from_dict(
        DataConfig,
        {
            "sources": [{"name": "a", "type": "jsonl", "path": "/tmp"}],
            "tokenizer": {"train": {"vocab_size": 1000}},
            "executor": {"tasks": 3, "workers": 2, **executor},
        },
    )


def test_stage_graph_trains_tokenizer_before_shards(tmp_path):
    names = [
        (name, [type(s).__name__ for s in pipe], tasks)
        for name, pipe, tasks, _ in stages(_cfg(), tmp_path, ["/tmp"], None)
    ]
    assert names == [
        (
            "text",
            [
                "ReadStep",
                "DecodeStep",
                "NormalizeStep",
                "LangIdStep",
                "QualityStep",
                "PiiStep",
                "Stage1Writer",
            ],
            3,
        ),
        ("dedup-signatures", ["TextPartReader", "DedupSignatures"], 3),
        ("dedup-exact", ["ExactDedupTask"], 3),
        ("dedup-buckets", ["LshBucketTask"], 3),
        ("dedup-clusters", ["ClusterTask"], 1),
        ("dedup", ["TextPartReader", "DedupFilter", "KeptWriter"], 3),
        ("tokenizer", ["TrainTokenizerStep"], 1),
        ("shards", ["ShardStep"], 3),
        ("finalize", ["FinalizeStep"], 1),
    ]


def test_slurm_executors_chain_stages(tmp_path):
    from datatrove.executor import SlurmPipelineExecutor

    cfg = _cfg(kind="slurm")
    chain = []
    for name, pipe, tasks, workers in stages(cfg, tmp_path, ["/tmp"], None):
        chain.append(_executor(cfg, tmp_path, name, pipe, tasks, workers, chain[-1] if chain else None))
    assert all(isinstance(ex, SlurmPipelineExecutor) for ex in chain)
    assert [ex.world_size for ex in chain] == [3, 3, 3, 3, 1, 3, 1, 3, 1]
    assert all(b.depends is a for a, b in zip(chain, chain[1:]))
    assert Path(chain[0].logging_dir.path).name == "text"


def test_config_hash_ignores_worker_count_only():
    assert config_hash(_cfg(workers=1)) == config_hash(_cfg(workers=2))
    assert config_hash(_cfg(tasks=2)) != config_hash(_cfg(tasks=3))

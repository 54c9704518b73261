"""The engines and layouts the engine contract suite (tests/distributed/test_engine_contract.py) runs.

An engine joins the suite by adding its cases here: a layout is `configs/train/toy.yaml` plus `--set`
overrides on `world` gloo ranks. The first case is the reference every other case is compared with (one
process, native engine). `REFUSED` lists, per engine, settings it does not implement with the key its error
must name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCase:
    id: str
    world: int
    overrides: tuple[str, ...] = ()
    tolerance: float = 1e-5  # relative loss/eval difference to the one-process reference
    full: bool = False  # slow (minutes): runs under `make test-full` only


CASES = [
    EngineCase("native-single", 1, ("parallel.strategy=single",)),
    EngineCase("native-ddp-2", 2, ("parallel.strategy=ddp",)),
    EngineCase("native-fsdp-2", 2, ("parallel.strategy=fsdp",)),
    # DeepSpeed ZeRO: one stage in the default suite, the others (and offload) in the full one
    EngineCase("deepspeed-zero3-2", 2, ("engine.name=deepspeed", "engine.zero_stage=3")),
    EngineCase("deepspeed-zero1-2", 2, ("engine.name=deepspeed", "engine.zero_stage=1"), full=True),
    EngineCase("deepspeed-zero2-2", 2, ("engine.name=deepspeed", "engine.zero_stage=2"), full=True),
    EngineCase(
        "deepspeed-zero3-offload-2",
        2,
        (
            "engine.name=deepspeed",
            "engine.zero_stage=3",
            "engine.offload_optimizer=cpu",
            "engine.offload_params=cpu",
        ),
        full=True,
    ),  # fmt: skip
]

# engine -> [(world size, overrides, the key the refusal must name)]
REFUSED: dict[str, list[tuple[int, tuple[str, ...], str]]] = {
    "native": [
        (2, ("parallel.tensor_parallel=2",), "parallel.tensor_parallel"),
        (2, ("parallel.pipeline_parallel=2",), "parallel.pipeline_parallel"),
        (2, ("parallel.context_parallel=2",), "parallel.context_parallel"),
        (2, ("parallel.expert_parallel=2",), "parallel.expert_parallel"),
        (2, ("parallel.strategy=single",), "parallel.strategy"),
        (1, ("engine.zero_stage=3",), "engine.zero_stage"),
        (1, ("engine.offload_optimizer=cpu",), "engine.offload_optimizer"),
    ],
    "deepspeed": [
        (2, ("parallel.expert_parallel=2",), "parallel.expert_parallel"),
        (2, ("parallel.tensor_parallel=2",), "parallel.tensor_parallel"),
        (2, ("parallel.pipeline_parallel=2",), "parallel.pipeline_parallel"),
        (2, ("parallel.strategy=fsdp",), "parallel.strategy"),
        (2, ("engine.zero_stage=0",), "engine.zero_stage"),
        (2, ("engine.zero_stage=2", "engine.offload_params=cpu"), "engine.offload_params"),
    ],
}

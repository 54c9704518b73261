"""The engines and layouts the engine contract suite (tests/distributed/test_engine_contract.py) runs.

An engine joins the suite by adding its cases here: a layout is `configs/train/toy.yaml` plus `--set`
overrides on `world` gloo ranks. The first case is the reference every other case is compared with (one
process, native engine). `REFUSED` lists, per engine, settings it does not implement with the key its error
must name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from megatron_cpu import install as megatron_cpu


@dataclass(frozen=True)
class EngineCase:
    id: str
    world: int
    overrides: tuple[str, ...] = ()
    tolerance: float = 1e-5  # relative loss/eval difference to the one-process reference
    setup: Callable[[], None] | None = None  # run first in each rank (spawned even for world 1)
    full: bool = False  # only in `make test-full` (minutes on the CI machine)


CASES = [
    EngineCase("native-single", 1, ("parallel.strategy=single",)),
    EngineCase("native-ddp-2", 2, ("parallel.strategy=ddp",)),
    EngineCase("native-fsdp-2", 2, ("parallel.strategy=fsdp",)),
    # megatron-core on CPU through the tests' CUDA redirect; tolerance as issue 16 states it
    *(
        EngineCase(f"megatron-{name}", world, ("engine.name=megatron", *more), 1e-4, megatron_cpu, full=True)
        for name, world, more in [
            ("single", 1, ()),
            ("ep-2", 2, ("parallel.expert_parallel=2",)),
            ("tp-2", 2, ("parallel.tensor_parallel=2",)),
            ("pp-2", 2, ("parallel.pipeline_parallel=2",)),
        ]
    ),
]

# engine -> [(world size, overrides, the key the refusal must name)]
REFUSED: dict[str, list[tuple[int, tuple[str, ...], str]]] = {
    "native": [
        (2, ("parallel.tensor_parallel=2",), "parallel.tensor_parallel"),
        (2, ("parallel.pipeline_parallel=2",), "parallel.pipeline_parallel"),
        (2, ("parallel.context_parallel=2",), "parallel.context_parallel"),
        (2, ("parallel.expert_parallel=2",), "parallel.expert_parallel"),
        (2, ("parallel.strategy=single",), "parallel.strategy"),
    ],
    "megatron": [
        (2, ("parallel.context_parallel=2",), "parallel.context_parallel"),
        (2, ("parallel.strategy=fsdp",), "parallel.strategy"),
        (1, ("model.balance_loss_coeff=0.01",), "model.balance_loss_coeff"),
        (1, ("model.norm_topk_prob=false",), "model.norm_topk_prob"),
    ],
}

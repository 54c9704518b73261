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


CASES = [
    EngineCase("native-single", 1, ("parallel.strategy=single",)),
    EngineCase("native-ddp-2", 2, ("parallel.strategy=ddp",)),
    EngineCase("native-fsdp-2", 2, ("parallel.strategy=fsdp",)),
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
}

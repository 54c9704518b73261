"""The engines and layouts the engine contract suite (tests/distributed/test_engine_contract.py) runs.

An engine joins the suite by adding its cases here: a layout is `configs/train/toy.yaml` plus `--set`
overrides on `world` gloo ranks, compared with its one-process native reference (`REFERENCES`). `REFUSED` lists, per engine, settings it does not implement with the key its error
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
    reference: str = "native-single"  # the one-process run (of REFERENCES) it is compared with


# megatron's seq_aux_loss counts other tokens than kmoe's balance loss, so the megatron engine refuses it: its
# cases and their one-process reference train without it
NO_BALANCE_LOSS = ("model.balance_loss_coeff=0",)

CASES = [
    EngineCase("native-single", 1, ("parallel.strategy=single",)),
    EngineCase("native-ddp-2", 2, ("parallel.strategy=ddp",)),
    EngineCase("native-fsdp-2", 2, ("parallel.strategy=fsdp",)),
    EngineCase("native-ep2", 2, ("parallel.expert_parallel=2",)),
    EngineCase("native-ep2-fsdp2", 4, ("parallel.expert_parallel=2", "train.micro_batch_size=2"), full=True),
    EngineCase("native-ep4", 4, ("parallel.expert_parallel=4", "train.micro_batch_size=2"), full=True),
    # megatron-core on CPU through the tests' CUDA redirect; tolerance as issue 16 states it
    *(
        EngineCase(
            f"megatron-{name}",
            world,
            ("engine.name=megatron", *NO_BALANCE_LOSS, *more),
            1e-4,
            megatron_cpu,
            full=True,
            reference="native-single-no-balance-loss",
        )
        for name, world, more in [
            ("single", 1, ()),
            ("ep-2", 2, ("parallel.expert_parallel=2",)),
            ("tp-2", 2, ("parallel.tensor_parallel=2",)),
            ("pp-2", 2, ("parallel.pipeline_parallel=2",)),
        ]
    ),
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

# the one-process runs the cases are compared with, by id
REFERENCES = {
    c.id: c
    for c in (
        EngineCase("native-single", 1, ("parallel.strategy=single",)),
        EngineCase("native-single-no-balance-loss", 1, ("parallel.strategy=single", *NO_BALANCE_LOSS)),
    )
}

# engine -> [(world size, overrides, the key the refusal must name)]
REFUSED: dict[str, list[tuple[int, tuple[str, ...], str]]] = {
    "native": [
        (2, ("parallel.tensor_parallel=2",), "parallel.tensor_parallel"),
        (2, ("parallel.pipeline_parallel=2",), "parallel.pipeline_parallel"),
        (2, ("parallel.context_parallel=2",), "parallel.context_parallel"),
        (2, ("parallel.strategy=single",), "parallel.strategy"),
        (2, ("parallel.strategy=ddp", "parallel.expert_parallel=2"), "parallel.strategy"),
        (4, ("parallel.expert_parallel=3",), "parallel.expert_parallel"),
        (1, ("engine.zero_stage=3",), "engine.zero_stage"),
        (1, ("engine.offload_optimizer=cpu",), "engine.offload_optimizer"),
    ],
    "megatron": [
        (2, ("parallel.context_parallel=2",), "parallel.context_parallel"),
        (2, ("parallel.strategy=fsdp",), "parallel.strategy"),
        (1, ("model.balance_loss_coeff=0.01",), "model.balance_loss_coeff"),
        (1, ("model.norm_topk_prob=false",), "model.norm_topk_prob"),
        (1, ("engine.zero_stage=3",), "engine.zero_stage"),
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

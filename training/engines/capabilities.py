"""What each training engine implements: the one table a run config is checked against before anything runs.

`training.config.validate` calls `check_engine`, so `kmoe train` (dry run or not) and `kmoe launch slurm`
refuse an engine, a parallel strategy, a parallel dimension or an engine option that the named engine does
not implement, before a file, a key or a job exists. An engine that gains a feature flips its entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Any

from kmoe.configtree import ConfigError
from training.dims import PARALLEL_KEYS as PARALLEL_DIMS


@dataclass(frozen=True)
class EngineCapabilities:
    implemented: bool
    strategies: frozenset[str] = frozenset()  # parallel.strategy values it runs
    parallel_dims: frozenset[str] = frozenset()  # parallel.* sizes that may exceed 1
    options: dict[str, frozenset[Any]] = field(default_factory=dict)  # engine.<key> -> accepted values
    hints: dict[str, str] = field(default_factory=dict)  # what to use instead, by config key
    check: str = (
        ""  # "module:function(cfg)" with the engine's own refusals (model settings it cannot compute)
    )


CAPABILITIES: dict[str, EngineCapabilities] = {
    "native": EngineCapabilities(
        implemented=True,
        strategies=frozenset({"auto", "single", "ddp", "fsdp"}),
        parallel_dims=frozenset({"expert_parallel"}),
        hints={
            "engine.zero_stage": "it has no ZeRO stages (parallel.strategy=fsdp shards parameters, gradients "
            "and optimizer state, as ZeRO-3 does)",
            "parallel": "it runs data parallelism (parallel.strategy single/ddp/fsdp) and expert parallelism "
            "(parallel.expert_parallel); tensor, pipeline and context parallelism need engine.name=megatron",
        },
    ),
    "megatron": EngineCapabilities(
        implemented=True,
        strategies=frozenset({"auto", "ddp"}),  # megatron's DDP with the distributed optimizer
        parallel_dims=frozenset({"expert_parallel", "tensor_parallel", "pipeline_parallel"}),
        hints={
            "engine.zero_stage": "it shards optimizer state with its distributed optimizer (engine.name=deepspeed "
            "for ZeRO stages)",
            "parallel.context_parallel": "not implemented by kmoe's megatron engine yet",
        },
        check="training.engines.megatron.spec:check_run",
    ),
    "deepspeed": EngineCapabilities(
        implemented=True,
        strategies=frozenset({"auto"}),  # it shards by engine.zero_stage
        options={
            "zero_stage": frozenset({1, 2, 3}),
            "offload_optimizer": frozenset({"none", "cpu"}),
            "offload_params": frozenset({"none", "cpu"}),
        },
        hints={
            "parallel": "it runs ZeRO data parallelism (engine.zero_stage); kmoe's experts are plain parameters "
            "there: expert, tensor and pipeline parallelism need engine.name=native (EP) or megatron",
            "parallel.strategy": "it shards by engine.zero_stage (leave parallel.strategy at auto)",
        },
        check="training.engines.deepspeed.settings:validate_deepspeed",
    ),
}


def implemented_engines() -> list[str]:
    return sorted(name for name, cap in CAPABILITIES.items() if cap.implemented)


def check_engine(cfg: Any, world_size: int | None = None) -> None:
    """Raise ConfigError naming the first `engine.*`/`parallel.*` setting the engine does not implement."""
    name = cfg.engine.name
    cap = CAPABILITIES.get(name)
    if cap is None or not cap.implemented:
        raise ConfigError(
            f"engine.name: the {name!r} engine is not implemented yet (available: {', '.join(implemented_engines())})"
        )
    p = cfg.parallel
    if p.strategy not in cap.strategies:
        raise ConfigError(
            f"parallel.strategy: {p.strategy!r} is not implemented by the {name} engine "
            f"(it runs: {', '.join(sorted(cap.strategies))})"
            + (f"; {cap.hints['parallel.strategy']}" if "parallel.strategy" in cap.hints else "")
        )
    if world_size is not None and world_size > 1 and p.strategy == "single":
        raise ConfigError(f"parallel.strategy: 'single' with {world_size} ranks; use ddp or fsdp")
    for dim in PARALLEL_DIMS:
        size = getattr(p, dim)
        if size > 1 and dim not in cap.parallel_dims:
            hint = cap.hints.get(f"parallel.{dim}", cap.hints.get("parallel", ""))
            raise ConfigError(
                f"parallel.{dim}: {size} is not implemented by the {name} engine"
                + (f"; {hint}" if hint else "")
            )
    defaults = type(cfg.engine)()
    for f in fields(cfg.engine):
        if f.name == "name":
            continue
        value, accepted = getattr(cfg.engine, f.name), cap.options.get(f.name)
        if (value in accepted) if accepted is not None else value == getattr(defaults, f.name):
            continue
        if accepted is not None:
            hint = f"it accepts {', '.join(map(repr, sorted(accepted)))}"
        else:
            owners = [n for n, c in CAPABILITIES.items() if f.name in c.options]
            default_hint = (
                f"a setting of engine.name={' or '.join(owners)}" if owners else "it does not read it"
            )
            hint = f"{cap.hints.get(f'engine.{f.name}', default_hint)}; leave it at {getattr(defaults, f.name)!r}"
        raise ConfigError(f"engine.{f.name}: {value!r} is not implemented by the {name} engine; {hint}")
    if cap.check:
        module, func = cap.check.split(":")
        getattr(importlib.import_module(module), func)(cfg)

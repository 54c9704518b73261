"""A megatron-core `GPTModel` that computes what kmoe's `model/` computes, and the checks that it can.

`transformer_config` maps a `ModelConfig` plus a parallel layout onto megatron's `TransformerConfig`;
`build_gpt_model` builds the stage of the model this rank holds. The TransformerEngine layer spec is used when
TE is importable, megatron's local spec otherwise (with kmoe's RMSNorm, because megatron's torch-norm wrapper
refuses sequence parallelism without Apex/TE). Whatever megatron cannot express exactly is refused with a
`ConfigError` naming the `model.*` or `parallel.*` key, before any process group or tensor is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kmoe.configtree import ConfigError
from model.config import ModelConfig
from model.layers import RMSNorm

try:  # TransformerEngine is optional: GPU clusters have it, this CPU machine does not
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


@dataclass(frozen=True)
class Layout:
    """Parallel sizes megatron builds its process groups from (data parallel is what is left)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1

    @property
    def etp(self) -> int:
        """Expert tensor parallel size. With EP > 1 experts stay whole and are split over EP only; with
        EP = 1 they are TP-split like the dense MLP: megatron 0.16.1 reduces expert gradients over the
        expert data-parallel group only when EP > 1, so whole experts under TP > 1 and EP = 1 would keep
        per-rank partial gradients (measured here)."""
        return 1 if self.ep > 1 else self.tp

    @property
    def sequence_parallel(self) -> bool:
        # megatron requires sequence parallelism for MoE layers under TP; it also saves activation memory.
        return self.tp > 1

    @classmethod
    def from_parallel(cls, par) -> Layout:
        return cls(
            tp=par.tensor_parallel,
            pp=par.pipeline_parallel,
            ep=par.expert_parallel,
            cp=getattr(par, "context_parallel", 1),
        )


def check_run(cfg) -> Layout:
    """Every refusal of the megatron engine for a RunConfig, before any compute; `validate` calls it."""
    layout = Layout.from_parallel(cfg.parallel)
    check_expressible(cfg.model, layout)
    if cfg.parallel.strategy not in ("auto", "ddp"):
        raise ConfigError(
            f"parallel.strategy: {cfg.parallel.strategy!r} is the native engine's; megatron always runs its "
            "DDP with the distributed optimizer (leave it auto)"
        )
    if layout.cp > 1:
        raise ConfigError("parallel.context_parallel: not implemented by the megatron engine yet")
    if cfg.train.compile:
        raise ConfigError("train.compile: not implemented by the megatron engine")
    return layout


def check_expressible(m: ModelConfig, layout: Layout, use_te: bool = HAVE_TE) -> None:
    """Raise ConfigError for any model or layout setting megatron would compute differently."""
    if m.router_score == "sigmoid" and m.num_experts_per_tok > 1 and not m.norm_topk_prob:
        raise ConfigError(
            "model.norm_topk_prob: megatron always normalises sigmoid top-k weights (k > 1); "
            "set it to true or use the native engine"
        )
    if m.router_score == "sigmoid" and m.num_experts_per_tok == 1 and m.norm_topk_prob:
        raise ConfigError(
            "model.norm_topk_prob: with num_experts_per_tok=1 megatron weights the expert by its sigmoid "
            "score, kmoe by 1.0; set norm_topk_prob: false"
        )
    if m.router_score == "softmax" and m.bias_update_rate > 0:
        raise ConfigError(
            "model.router_score: megatron's expert bias (aux-loss-free balancing) needs sigmoid scores; "
            "use sigmoid or set model.bias_update_rate: 0"
        )
    if m.balance_loss_coeff > 0:
        raise ConfigError(
            "model.balance_loss_coeff: megatron's seq_aux_loss counts the unbiased top-k, kmoe's counts the "
            "experts actually chosen; the megatron engine refuses it rather than train another objective: set "
            "model.balance_loss_coeff=0 (the aux-loss-free bias, model.bias_update_rate, still balances)"
        )
    if m.z_loss_coeff > 0:
        raise ConfigError(
            "model.z_loss_coeff: megatron scales the router z-loss per local token, kmoe per micro-batch; "
            "set it to 0 for the megatron engine"
        )
    _check_layout(m, layout, use_te)


def _check_layout(m: ModelConfig, layout: Layout, use_te: bool) -> None:
    for key, value in dataclasses.asdict(layout).items():
        if value < 1:
            raise ConfigError(f"parallel: {key} size must be >= 1, got {value}")
    if layout.cp > 1 and not use_te:
        raise ConfigError(
            "parallel.context_parallel: megatron's local attention has no context parallelism; "
            "it needs TransformerEngine"
        )
    if layout.tp > 1:
        for key in ("vocab_size", "num_heads", "num_kv_heads", "dense_intermediate_size"):
            if key == "dense_intermediate_size" and not m.first_k_dense:
                continue
            if getattr(m, key) % layout.tp:
                raise ConfigError(
                    f"parallel.tensor_parallel: {layout.tp} does not divide model.{key} ({getattr(m, key)})"
                )
        if layout.etp > 1 and m.expert_intermediate_size % layout.etp:
            raise ConfigError(
                f"parallel.tensor_parallel: {layout.tp} does not divide model.expert_intermediate_size "
                f"({m.expert_intermediate_size}); with expert_parallel 1 experts are tensor-parallel too"
            )
        shared = m.expert_intermediate_size * m.num_shared_experts
        if shared % layout.tp:
            raise ConfigError(
                f"parallel.tensor_parallel: {layout.tp} does not divide the shared-expert width "
                f"model.expert_intermediate_size x num_shared_experts ({shared})"
            )
    if m.num_experts % layout.ep:
        raise ConfigError(
            f"parallel.expert_parallel: {layout.ep} does not divide model.num_experts ({m.num_experts})"
        )
    if m.num_layers % layout.pp:
        raise ConfigError(
            f"parallel.pipeline_parallel: {layout.pp} does not divide model.num_layers ({m.num_layers})"
        )


def moe_layer_pattern(m: ModelConfig) -> list[int]:
    """megatron's `moe_layer_freq` list: 0 for a dense layer, 1 for an MoE layer."""
    return [int(m.is_moe_layer(i)) for i in range(m.num_layers)]


def transformer_config(
    m: ModelConfig, layout: Layout, params_dtype: torch.dtype = torch.float32, use_te: bool = HAVE_TE
):
    """megatron's TransformerConfig for `m` under `layout` (validated first)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_expressible(m, layout, use_te)
    shared = m.expert_intermediate_size * m.num_shared_experts
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.dim_head,
        ffn_hidden_size=m.dense_intermediate_size if m.first_k_dense else m.expert_intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        qk_layernorm=m.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        # megatron tags tensor-parallel weights (what its grad norm and checkpoints rely on) only inside its
        # init functions, so they must run; the values are then replaced by kmoe's seeded init (runtime.py).
        perform_initialization=True,
        use_cpu_initialization=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        pipeline_dtype=params_dtype,
        num_moe_experts=m.num_experts,
        moe_layer_freq=moe_layer_pattern(m),
        moe_router_topk=m.num_experts_per_tok,
        moe_ffn_hidden_size=m.expert_intermediate_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_score_function=m.router_score,
        moe_router_pre_softmax=m.router_score == "softmax" and not m.norm_topk_prob,
        moe_router_topk_scaling_factor=m.routed_scaling_factor,
        moe_router_enable_expert_bias=m.router_score == "sigmoid",
        # The trap Megatron-Bridge's GLM-4.5 bridge fell into (rate 0 silently disables balancing):
        # the rate is kmoe's, always.
        moe_router_bias_update_rate=m.bias_update_rate,
        moe_router_dtype="fp32",  # kmoe routes in fp32
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        calculate_per_token_loss=True,  # loss = summed token CE / tokens of the global batch, as native
    )


class MegatronRMSNorm(RMSNorm):
    """kmoe's RMSNorm with megatron's constructor; tagged so megatron all-reduces its grads under SP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_local_norms(spec):
    """Replace megatron's torch-norm wrapper in a local layer spec by MegatronRMSNorm (recursively)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return MegatronRMSNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_with_local_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _with_local_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list):
        return [_with_local_norms(s) for s in spec]
    return spec


def block_spec(config, use_te: bool = HAVE_TE, pp_rank: int | None = None):
    """The decoder block spec of this pipeline stage: TE modules when available, local ones otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", pp_rank=pp_rank
    )
    return spec if use_te else _with_local_norms(spec)


def _patch_megatron_without_te() -> None:
    """megatron-core 0.16.1's router references `te_general_gemm`, defined only when TE imports.

    Without TE every MoE forward raises NameError (on GPU too); define it as absent so the router takes
    its plain-torch branch.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(m: ModelConfig, config, use_te: bool = HAVE_TE, pp_rank: int | None = None):
    """This rank's stage of the GPTModel (process groups must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    if not use_te:
        _patch_megatron_without_te()
    rank = ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    size = ps.get_pipeline_model_parallel_world_size()
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, use_te, pp_rank=rank),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_seq_len,
        pre_process=rank == 0,
        post_process=rank == size - 1,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=m.rotary_fraction,
        rotary_base=m.rope_theta,
    )

"""`kmoe model info|smoke` and `kmoe export hf`."""

from __future__ import annotations

import argparse
import json

from kmoe.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p_model = sub.add_parser("model", help="inspect the model a config describes")
    msub = p_model.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    p = msub.add_parser("info", help="parameters, FLOPs per token and weight memory of a config")
    p.add_argument("--config", required=True, help="a configs/model/*.yaml or a run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default: data.seq_len)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = msub.add_parser("smoke", help="random-init the model, run one forward/backward, save a checkpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="directory for the kmoe checkpoint")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=cmd_smoke)

    p_exp = sub.add_parser("export", help="export a checkpoint to another format")
    esub = p_exp.add_subparsers(dest="export_command", metavar="FORMAT", required=True)
    p = esub.add_parser("hf", help="stock Hugging Face Glm4MoeForCausalLM directory (no trust_remote_code)")
    p.add_argument(
        "checkpoint", help="a kmoe checkpoint directory (config.yaml + model.safetensors or model/ shards)"
    )
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="tokenizer directory to include (default: the checkpoint's run's, "
                     "found from its config and checked against its ledger)")  # fmt: skip
    tok.add_argument("--no-tokenizer", action="store_true",
                     help="export without a tokenizer (for a checkpoint whose tokenizer is unknown); "
                     "the model card says so")  # fmt: skip
    p.add_argument(
        "--verify", action="store_true", help="load with transformers and compare logits with ours"
    )
    p.set_defaults(func=cmd_export_hf)


def cmd_info(args: argparse.Namespace) -> int:
    from kmoe.configtree import read_yaml
    from model.params import human, human_bytes, model_size
    from training.config import load_run_config

    cfg = load_run_config(args.config, args.set)
    # A bare model config has no data section: count FLOPs at the model's context length.
    default_seq = cfg.data.seq_len if "model" in read_yaml(args.config) else cfg.model.max_seq_len
    size = model_size(cfg.model, args.seq_len or default_seq)
    info = {
        "config": args.config,
        "total_params": size.total,
        "active_params": size.active,
        "breakdown": {
            "embedding+lm_head": size.embedding,
            "attention": size.attention,
            "routed_experts": size.routed_experts,
            "shared+dense_ffn": size.shared_and_dense_ffn,
            "router": size.router,
            "norms": size.norms,
        },  # fmt: skip
        "seq_len": size.seq_len,
        "flops_per_token_forward": size.flops_fwd_per_token,
        "flops_per_token_training": size.flops_train_per_token,
        "weight_bytes": {
            "bf16": size.weight_bytes(16),
            "int8": size.weight_bytes(8),
            "int4": size.weight_bytes(4),
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = cfg.model
    lines = [
        f"model {args.config}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads "
        f"({m.num_kv_heads} KV, head dim {m.dim_head}), {m.num_experts} experts x {m.expert_intermediate_size} "
        f"(top-{m.num_experts_per_tok}, {m.num_shared_experts} shared), vocab {m.vocab_size}",
        f"  total parameters     {human(size.total):>10}  ({size.total:,})",
        f"  active parameters    {human(size.active):>10}  ({size.active:,})",
    ]
    lines += [f"    {k:<18} {human(v):>10}" for k, v in info["breakdown"].items()]
    lines += [
        f"  FLOPs/token forward  {human(size.flops_fwd_per_token):>10}  (seq {size.seq_len})",
        f"  FLOPs/token training {human(size.flops_train_per_token):>10}  (3x forward)",
        "  weights in memory    "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["weight_bytes"].items()),
    ]
    emit("\n".join(lines))
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    import torch

    from model import MoETransformer, init_weights
    from model.checkpoint import model_state, save_model_dir
    from training.config import config_dict, load_run_config

    cfg = load_run_config(args.config, args.set)
    torch.manual_seed(args.seed)
    model = MoETransformer(cfg.model)
    init_weights(model, cfg.model, args.seed)
    record = save_model_dir(args.out, model_state(model), config_dict(cfg))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.data.seq_len) + 1))
    out = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    emit(
        f"smoke: forward/backward ok, loss {loss.item():.4f} (ln V = {torch.log(torch.tensor(cfg.model.vocab_size)).item():.4f}), "
        f"grad norm {grad_norm:.4f}; checkpoint {args.out} (merkle root {record['merkle_root'][:16]}...)"
    )
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kmoe.run_tokenizer import RunTokenizer, checkpoint_tokenizer
    from model.export_card import export_card, tokenizer_section
    from model.export_hf import export_hf

    if args.no_tokenizer:
        tok = RunTokenizer(None, None, "none", None)
    else:
        tok = checkpoint_tokenizer(args.checkpoint, args.tokenizer)  # before any tensor is read
    summary = export_hf(args.checkpoint, args.out_dir, dtype=args.dtype, tokenizer_dir=tok.path)
    section = tokenizer_section(tok.how, tok.path, tok.digest, tok.ledger)
    card = export_card(args.dtype, summary["total_params"], section)
    (Path(args.out_dir) / "README.md").write_text(card, encoding="utf-8")
    said = {"run": f"the run's tokenizer {tok.path} (matches the ledger)", "none": "NO tokenizer (--no-tokenizer)",
            "given": f"tokenizer {tok.path}" + (" (matches the ledger)" if tok.ledger else "")}[tok.how]  # fmt: skip
    emit(
        f"exported {args.checkpoint} -> {args.out_dir} as Glm4MoeForCausalLM ({len(summary['shards'])} shard(s)), "
        f"with {said}"
    )
    if args.verify:
        from model.hf_check import compare_logits

        diff = compare_logits(args.checkpoint, args.out_dir)
        emit(f"verify: transformers loaded it; max |logit diff| vs kmoe = {diff:.3e} ({args.dtype})")
    return 0

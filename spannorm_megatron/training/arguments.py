"""Command-line flags of `spannorm-train`, named as Megatron-LM names them, plus `--config FILE`.

A YAML config holds the same flags (dashes or underscores, e.g. `num-layers: 8`); flags given
on the command line override it. `model_config(args)` and `parallel_config(args)` turn the
parsed namespace into the package's dataclasses, which validate the values.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional

import yaml

from spannorm_megatron.config import ModelConfig, ParallelConfig
from spannorm_megatron.errors import ConfigError


def _scale_init(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spannorm-train",
        description="Train a GPT model with a chosen norm placement on megatron-core. "
        "Launch with torchrun (one node or many); without a GPU it runs on CPU with gloo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=None, help="YAML file of flags; command-line flags win.")

    m = p.add_argument_group("model")
    m.add_argument("--norm-placement", default="spannorm",
                   help="prenorm, postnorm, spannorm, deepnorm, perinorm or spannorm_clean "
                   "(see shared/design/norm-placements.md).")
    m.add_argument("--num-layers", type=int, default=4)
    m.add_argument("--hidden-size", type=int, default=256)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--group-query-attention", action="store_true",
                   help="Use --num-query-groups key/value heads (Megatron-LM's switch).")
    m.add_argument("--num-query-groups", type=int, default=None)
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden.")
    m.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm", "LayerNorm"])
    m.add_argument("--norm-epsilon", type=float, default=1e-5)
    m.add_argument("--apply-layernorm-1p", action="store_true")
    m.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--add-bias-linear", action="store_true",
                   help="Biases in linear layers (off by default, like --disable-bias-linear).")
    m.add_argument("--disable-bias-linear", action="store_true", help="Accepted for Megatron-LM "
                   "scripts; biases are off unless --add-bias-linear.")
    m.add_argument("--position-embedding-type", default="rope",
                   choices=["rope", "learned_absolute", "none"])
    m.add_argument("--rotary-base", type=int, default=10000)
    m.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Default: --seq-length.")
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the tokenizer's vocabulary to a multiple of this x TP size.")
    m.add_argument("--untie-embeddings-and-output-weights",
                   action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--hidden-dropout", type=float, default=0.0)
    m.add_argument("--attention-dropout", type=float, default=0.0)
    m.add_argument("--scale-init", type=_scale_init, default=None,
                   help="sqrt_depth, megatron, none or a positive number; default per placement.")
    m.add_argument("--scale-mode", default="init", choices=["init", "forward"])
    m.add_argument("--first-layer-input-norm", action=argparse.BooleanOptionalAction,
                   default=True)
    m.add_argument("--final-norm", action=argparse.BooleanOptionalAction, default=None)
    m.add_argument("--transformer-impl", default="auto",
                   choices=["auto", "local", "transformer_engine"])

    moe = p.add_argument_group("mixture of experts")
    moe.add_argument("--num-experts", type=int, default=None)
    moe.add_argument("--moe-router-topk", type=int, default=2)
    moe.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    moe.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    moe.add_argument("--moe-router-load-balancing-type", default="aux_loss")
    moe.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    moe.add_argument("--moe-token-dispatcher-type", default="alltoall")
    moe.add_argument("--moe-grouped-gemm", action="store_true")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    par.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    par.add_argument("--expert-model-parallel-size", type=int, default=1)
    par.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"],
                     help="Default: nccl on GPUs, gloo on CPU (the only pairs that run).")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--global-batch-size", type=int, default=None,
                   help="Default: micro batch x data-parallel size (no accumulation).")
    t.add_argument("--seq-length", type=int, default=256)
    t.add_argument("--train-iters", type=int, default=100)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", default="cosine",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    t.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--calculate-per-token-loss", action="store_true",
                   help="Gradient of the token-weighted mean loss over all micro-batches and "
                   "data-parallel ranks (default, as in Megatron-LM: the mean of each "
                   "micro-batch's token mean). The logged loss is token-weighted either way.")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.95)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--exit-interval", type=int, default=None,
                   help="Save (if --save) and exit at iterations divisible by this.")
    t.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Save (if --save) and exit once this run has lasted this long.")
    t.add_argument("--max-skipped-iterations", type=int, default=5,
                   help="Stop after this many steps in a row with NaN/Inf gradients (each such "
                   "step is skipped: no update).")
    t.add_argument("--loss-spike-factor", type=float, default=1.5,
                   help="Log a loss spike when the loss exceeds this x the running median.")
    t.add_argument("--loss-spike-window", type=int, default=50,
                   help="Iterations in the running median of --loss-spike-factor.")

    perf = p.add_argument_group(
        "precision, recompute and overlap (see spannorm_megatron.training.performance)")
    perf.add_argument("--bf16", action="store_true")
    perf.add_argument("--fp8-format", default=None, choices=["hybrid", "e4m3"],
                      help="FP8 GEMMs through Transformer Engine (with --bf16, on an FP8 GPU).")
    perf.add_argument("--fp8-recipe", default="delayed",
                      choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    perf.add_argument("--fp8-margin", type=int, default=0)
    perf.add_argument("--fp8-amax-history-len", type=int, default=1)
    perf.add_argument("--fp8-amax-compute-algo", default="most_recent",
                      choices=["most_recent", "max"])
    perf.add_argument("--fp8-param-gather", action="store_true",
                      help="Keep and all-gather parameters in FP8 (distributed optimizer).")
    perf.add_argument("--first-last-layers-bf16", action="store_true",
                      help="Run the first and last layers in bf16 under FP8.")
    perf.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    perf.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    perf.add_argument("--recompute-num-layers", type=int, default=None)
    perf.add_argument("--overlap-grad-reduce", action="store_true",
                      help="Reduce gradients bucket by bucket during the backward pass.")
    perf.add_argument("--overlap-param-gather", action="store_true",
                      help="All-gather updated parameters during the next forward pass "
                      "(distributed optimizer, with --overlap-grad-reduce).")
    perf.add_argument("--tp-comm-overlap", action="store_true",
                      help="Overlap tensor-parallel communication with GEMMs (Transformer "
                      "Engine on GPUs, with --sequence-parallel).")
    perf.add_argument("--ddp-bucket-size", type=int, default=None,
                      help="Elements per gradient-reduction bucket (default: megatron-core's).")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="*", default=None,
                   help="Prefixes of .bin/.idx datasets, optionally weighted: 'w1 p1 w2 p2'.")
    d.add_argument("--split", default="969,30,1")
    d.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    d.add_argument("--tokenizer-model", default=None)
    d.add_argument("--data-cache-path", default=None)
    d.add_argument("--num-workers", type=int, default=0)

    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--eval-interval", type=int, default=100)
    e.add_argument("--eval-iters", type=int, default=10)
    e.add_argument("--log-interval", type=int, default=10)
    e.add_argument("--tensorboard-dir", default=None)
    e.add_argument("--save", default=None)
    e.add_argument("--load", default=None)
    e.add_argument("--save-interval", type=int, default=None)
    e.add_argument("--no-load-optim", action="store_true")
    e.add_argument("--load-fallback", action="store_true",
                   help="If the latest checkpoint is damaged, load the newest earlier complete "
                   "one instead of stopping with an error.")
    e.add_argument("--no-load-rng", action="store_true")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file. Pass the path of a YAML file of flags.")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values.")
    known = {a.dest for a in parser._actions}
    defaults, unknown = {}, []
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest in known:
            defaults[dest] = value
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key(s) {unknown}; keys are flag names such as "
            f"num-layers or hidden_size (see spannorm-train --help)."
        )
    return defaults


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_config_defaults(parser, first.config))
    args = parser.parse_args(argv)
    _resolve(args)
    return args


def _resolve(args: argparse.Namespace) -> None:
    """Fill derived defaults and translate Megatron-LM's alternative spellings."""
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
            f"{args.lr_decay_iters} (default: --train-iters): shorten the warm-up or decay longer.")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        stages = args.pipeline_model_parallel_size * args.num_layers_per_virtual_pipeline_stage
        if args.num_layers % stages:
            raise ConfigError(
                f"--num-layers {args.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size x --num-layers-per-virtual-pipeline-stage = "
                f"{stages}."
            )
        args.virtual_pipeline_model_parallel_size = args.num_layers // stages
    if args.group_query_attention and args.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N.")


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by x TP size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        norm_placement=args.norm_placement,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        # As in Megatron-LM: the group count counts only with --group-query-attention, so one
        # YAML builds the same model in both stacks.
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization=args.normalization,
        norm_epsilon=args.norm_epsilon,
        apply_layernorm_1p=args.apply_layernorm_1p,
        swiglu=args.swiglu,
        add_bias_linear=args.add_bias_linear,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        max_sequence_length=args.max_position_embeddings,
        vocab_size=vocab_size,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        scale_init=args.scale_init,
        scale_mode=args.scale_mode,
        first_layer_input_norm=args.first_layer_input_norm,
        final_norm=args.final_norm,
        num_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm,
        transformer_impl=args.transformer_impl,
    )


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )

"""Command-line flags of `spannorm-train`, generated from the configuration dataclasses.

Each flag is a field of one of `SECTIONS` (`spannorm_megatron.config.options`): its doc, default,
Megatron-LM name and valid range are declared there once. A YAML config (`--config FILE`) holds
the same flags as keys (dashes or underscores, e.g. `num-layers: 8`), checked as the flags are;
flags on the command line override it. `parse_args` returns the run's `JobConfig`
(`spannorm_megatron.config.job`): every section built from the parsed flags and checked once.
The namespace stays inside this module (and `checkpoint_args.apply_checkpoint_args`, which
Megatron-LM applies to it before anything is checked).
"""

from __future__ import annotations

import argparse
import difflib
from typing import Dict, List, Optional

import yaml

from spannorm_megatron.config.checkpoint import CheckpointConfig
from spannorm_megatron.config.data import LEGACY_SPLIT, DataConfig, count_sources
from spannorm_megatron.config.environment import check_environment
from spannorm_megatron.config.hooks import RunHooksConfig
from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.config.logging import LoggingConfig, MetricsLoggingConfig
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import (
    add_arguments,
    coerce,
    fill_fallbacks,
    from_namespace,
    missing_required,
    options,
    path_type,
)
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.performance import PerformanceConfig
from spannorm_megatron.config.rollback import RollbackConfig
from spannorm_megatron.config.spellings import MegatronSpellings
from spannorm_megatron.config.tokenizer import TokenizerConfig
from spannorm_megatron.config.training import TrainingConfig
from spannorm_megatron.config.unavailable import Unavailable
from spannorm_megatron.config.yaml_file import load_yaml
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.training import megatron_lm


SECTIONS = (
    ("model", ModelConfig),
    ("parallelism", ParallelConfig),
    ("training", TrainingConfig),
    ("precision, recompute and overlap (see spannorm_megatron.config.performance)",
     PerformanceConfig),
    ("data", DataConfig),
    ("tokenizer", TokenizerConfig),
    ("evaluation and logging", LoggingConfig),
    ("logged metrics (Megatron-LM's logging flags)", MetricsLoggingConfig),
    ("checkpoints", CheckpointConfig),
    ("rollbacks: when the collapse alarm or a loss spike fires (see "
     "spannorm_megatron.training.rollback)", RollbackConfig),
    ("profiling, garbage collection and memory (see spannorm_megatron.training.hooks)",
     RunHooksConfig),
    ("Megatron-LM spellings", MegatronSpellings),
    ("Megatron-LM flags refused here, or without effect (see "
     "spannorm_megatron.config.unavailable)", Unavailable),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # A Megatron-LM flag we lack is refused with its reason, not as a typo.
        if message.startswith("unrecognized arguments:"):
            refused = megatron_lm.refusal(message.split(":", 1)[1].split())
            if refused:
                raise ConfigError(refused)
        # argparse names no alternative for a mistyped flag (before Python 3.14).
        if message.startswith("unrecognized arguments:"):
            known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
            hints = []
            for word in message.split(":", 1)[1].split():
                nearest = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if word.startswith("-") and nearest:
                    hints.append(f"{word} -> {nearest[0]}?")
            if hints:
                message += " (did you mean: " + ", ".join(hints) + ")"
        # Not argparse's usage dump (a hundred flags would bury the one line that matters) and
        # not printed here: run_cli reports it once, on rank 0, and to torchrun.
        raise ConfigError(f"{message} (`{self.prog} --help` lists every flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spannorm-train",
        description="Train a GPT model with a chosen norm placement on megatron-core. "
        "Launch with torchrun (one node or many); without a GPU it runs on CPU with gloo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, type=path_type("input_file"),
                        help="YAML file of flags; command-line flags win.")
    for title, owner in SECTIONS:
        add_arguments(parser.add_argument_group(title), owner)
    return parser


def _fields_by_key() -> Dict[str, tuple]:
    """YAML key (the flag without dashes, or the field's name, in dashes or underscores) ->
    (owner, field, whether the key says the opposite of the field: a negative flag's name)."""
    keys = {}
    for _, owner in SECTIONS:
        for field in options(owner):
            flag = (field.metadata["flag"] or field.name).lstrip("-")
            for key in {field.name, field.name.replace("_", "-")}:
                keys[key] = (owner, field, False)
            for key in {flag, flag.replace("-", "_")}:
                keys[key] = (owner, field, field.metadata["negative"])
    return keys


def _config_defaults(path: str) -> dict:
    """The flags of the --config file (an input file: its parser's `type` checked that)."""
    try:
        with open(path) as f:
            values = load_yaml(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values.")
    known = _fields_by_key()
    defaults = {}
    for key, value in values.items():
        key = str(key).lstrip("-")
        if key not in known:
            refused = megatron_lm.refusal(["--" + key.replace("_", "-")])
            if refused:
                raise ConfigError(f"--config {path}: {refused}")
            nearest = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(
                f"--config {path}: unknown key {key!r}" + (
                    f"; did you mean {nearest[0]!r}?" if nearest else
                    "; keys are flag names such as num-layers (see spannorm-train --help)."))
        owner, field, opposite = known[key]
        value = coerce(owner, field, value, f"--config {path}")
        defaults[field.name] = (not value) if opposite else value
    return defaults


def parse_args(argv: Optional[List[str]] = None) -> JobConfig:
    """`spannorm-train`'s command line (and --config file) as the run's typed configuration,
    every section built and checked once."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_config_defaults(first.config))
    args = parser.parse_args(argv)
    if args.use_checkpoint_args:  # Megatron-LM's order: before any flag is checked or resolved
        from spannorm_megatron.training.checkpoint_args import apply_checkpoint_args

        apply_checkpoint_args(args)
    return _resolve(args)


def _resolve(args: argparse.Namespace) -> JobConfig:
    """Fill derived defaults, translate Megatron-LM's alternative spellings, and build every
    section once so that cross-field checks run before anything else. What the run should say
    once about the flags it was given goes to the job's notices (the Trainer prints them)."""
    owners = [owner for _, owner in SECTIONS]
    missing = missing_required(owners, args)
    if args.train_iters is None and args.train_samples is None:
        missing.append("--train-iters or --train-samples")
    if missing:
        raise ConfigError(
            f"the following flags are required (as in Megatron-LM): {', '.join(missing)}. Give "
            f"them on the command line or as keys of --config.")
    check_environment()
    fill_fallbacks(owners, args)
    args.notices = []
    if args.max_sequence_length < args.seq_length:
        raise ConfigError(
            f"--max-position-embeddings {args.max_sequence_length} is smaller than --seq-length "
            f"{args.seq_length}: the position embeddings must cover every position of a sample.")
    if args.split is None and args.data_path:
        args.notices.append(f"WARNING: --data-path without --split: using Megatron-LM's legacy "
                            f"default {LEGACY_SPLIT}.")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        args.virtual_pipeline_model_parallel_size = _virtual_stages_from_layers(args)
    if args.group_query_attention and args.num_query_groups is None:
        raise ConfigError("--group-query-attention needs --num-query-groups N.")
    _resolve_position_spellings(args)
    _note_unread_attention_flags(args)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        # ParallelConfig turns it off, as Megatron-LM's validate_args does.
        args.notices.append("--sequence-parallel with --tensor-model-parallel-size 1: sequence "
                            "parallelism is off (no tensor-parallel ranks to split the sequence "
                            "over; Megatron-LM disables it the same way).")
    training = from_namespace(TrainingConfig, args)
    # The model's own checks need no vocabulary (the tokenizer's comes later, in the Trainer).
    model = _model_config(args, vocab_size=args.make_vocab_size_divisible_by)
    # How the layers split over pipeline stages needs only --num-layers: checked here, before
    # the world size or the tokenizer are looked at.
    parallel = from_namespace(ParallelConfig, args)
    parallel.stage_layer_counts(args.num_layers)
    performance = from_namespace(PerformanceConfig, args)
    performance.check_model(model)
    args.notices.extend(performance.notices())
    if model.moe_enable_routing_replay:
        args.notices.append(
            "--moe-enable-routing-replay: every router has megatron-core's RouterReplay; "
            "spannorm-train sets no record/replay action (nor does Megatron-LM's pretrain), so "
            "tokens are routed as without it unless your code drives "
            "megatron.core.transformer.moe.router_replay.RouterReplay.")
    spellings = from_namespace(MegatronSpellings, args)
    if spellings.deprecated_use_mcore_models:
        args.notices.append("--use-mcore-models: megatron-core models are the only kind built "
                            "here (a no-op).")
    unavailable = from_namespace(Unavailable, args)
    args.notices += unavailable.notices()
    logging = from_namespace(LoggingConfig, args)
    metrics = from_namespace(MetricsLoggingConfig, args)
    hooks = from_namespace(RunHooksConfig, args)
    args.notices.extend(hooks.notices())
    checkpoint = from_namespace(CheckpointConfig, args)
    rollback = from_namespace(RollbackConfig, args)
    tokenizer = from_namespace(TokenizerConfig, args)
    data = None
    if count_sources(args.data_path, args.train_data_path, args.valid_data_path,
                     args.test_data_path, args.mock_data):
        data = from_namespace(DataConfig, args, seed=args.seed)
    return JobConfig(
        model=model, parallel=parallel, training=training, performance=performance, data=data,
        tokenizer=tokenizer, logging=logging, metrics=metrics, checkpoint=checkpoint,
        hooks=hooks, spellings=spellings, unavailable=unavailable, rollback=rollback,
        flags={name: value for name, value in vars(args).items() if name != "notices"},
        notices=args.notices, checkpoint_vocab_size=getattr(args, "padded_vocab_size", None))


def _resolve_position_spellings(args: argparse.Namespace) -> None:
    """Megatron-LM's validate_args, in its order: the deprecated rope switch sets the type,
    and --no-position-embedding is refused with any type but rope."""
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if not args.add_position_embedding and args.position_embedding_type != "rope":
        raise ConfigError(
            f"--no-position-embedding is deprecated and works only with --position-embedding-"
            f"type rope (Megatron-LM raises the same); this run has "
            f"{args.position_embedding_type}. Say what you want with --position-embedding-type "
            f"(none: no position embedding at all) and drop --no-position-embedding.")


# Flags that only multi-latent attention reads, with Megatron-LM's defaults.
_MLA_ONLY = {"q_lora_rank": None, "kv_lora_rank": 32, "qk_head_dim": 128,
             "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "rotary_scaling_factor": 1.0,
             "mscale": 1.0, "mscale_all_dim": 0.0}


def _note_unread_attention_flags(args: argparse.Namespace) -> None:
    """Flags Megatron-LM accepts and then does not read for this model: said once, not dropped
    silently."""
    if args.multi_latent_attention:
        if args.kv_channels is not None:
            args.notices.append(
                f"--kv-channels {args.kv_channels} is not read by multi-latent attention, whose "
                f"head widths are --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim (as in "
                f"Megatron-LM).")
        return
    given = [f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name, default in _MLA_ONLY.items() if getattr(args, name) != default]
    if given:
        args.notices.append(
            f"{', '.join(given)}: read only with --multi-latent-attention, which this run does "
            f"not use (as in Megatron-LM, they change nothing here).")


def _virtual_stages_from_layers(args: argparse.Namespace) -> Optional[int]:
    """Megatron-LM's reading of --num-layers-per-virtual-pipeline-stage: layers per pipeline
    stage (the embedding and loss counted where they are counted as layers) over layers per
    model chunk; one chunk per stage is the plain schedule (None)."""
    flag = "--num-layers-per-virtual-pipeline-stage"
    others = [name for name, given in (
        ("--num-virtual-stages-per-pipeline-rank", args.virtual_pipeline_model_parallel_size),
        ("--pipeline-model-parallel-layout", args.pipeline_model_parallel_layout),
    ) if given is not None]
    if others:
        raise ConfigError(f"{flag} and {others[0]} both set the virtual stages (Megatron-LM "
                          f"takes one of them): give only one.")
    uneven = [name for name, given in (
        ("--decoder-first-pipeline-num-layers", args.decoder_first_pipeline_num_layers),
        ("--decoder-last-pipeline-num-layers", args.decoder_last_pipeline_num_layers),
    ) if given is not None]
    if uneven:
        raise ConfigError(f"{flag} counts layers per chunk of even stages, and {uneven[0]} "
                          f"makes them uneven: give --num-virtual-stages-per-pipeline-rank "
                          f"instead (as Megatron-LM requires).")
    pp, per_chunk = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    layers = args.num_layers + int(args.account_for_embedding_in_pipeline_split) + int(
        args.account_for_loss_in_pipeline_split)
    counted = "" if layers == args.num_layers else f" (+{layers - args.num_layers} for the " \
        f"embedding/loss counted as layers = {layers})"
    if layers % (pp * per_chunk):
        raise ConfigError(
            f"--num-layers {args.num_layers}{counted} is not divisible by "
            f"--pipeline-model-parallel-size x {flag} = {pp * per_chunk}: every model chunk of "
            f"every stage holds {per_chunk} layers.")
    chunks = layers // pp // per_chunk
    return chunks if chunks > 1 else None


def _model_config(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    # As in Megatron-LM: the group count counts only with --group-query-attention, so one YAML
    # builds the same model in both stacks.
    return from_namespace(ModelConfig, args, vocab_size=vocab_size, num_query_groups=(
        args.num_query_groups if args.group_query_attention else None))

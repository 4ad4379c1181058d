"""The model of a resume and the checkpoint's: ``--use-checkpoint-args`` and the check that they
agree, both from the run record of the checkpoint ``--load`` resumes from.

``--use-checkpoint-args`` is Megatron-LM's flag (its ``load_args_from_checkpoint``): the
checkpoint's model arguments replace the command line's, before anything is checked or built.
As there, the sizes (`SIZES`: layers, width, heads, FFN width, sequence length, maximum
positions) are taken only where the command line (or ``--config``) leaves them unset, and the
structure (`STRUCTURE`: position embeddings, biases, activation, norm, dropout, MoE routing) is
taken over it; the tokenizer's type and model file too, unless
``--no-use-tokenizer-model-from-checkpoint-args`` (Megatron-LM's flag, on by default). To
Megatron-LM's list this adds the fields of ours that define the model the same way (the norm
placement and its switches, the routing settings megatron-core has beyond Megatron-LM's list):
every field the architecture check below compares, so a run that takes
them builds the checkpoint's model. The parallel layout is taken only with
``--use-mp-args-from-checkpoint-args`` (TP, PP, VPP and EP sizes), as in Megatron-LM. A
``--load`` without a checkpoint yet (the first launch of ``--save X --load X``) leaves the flags
as given, as in Megatron-LM.

`check_model_matches` is Megatron-LM's ``check_checkpoint_args`` on our side, run before any
process group exists: the model these flags describe must be the checkpoint's. It compares what
the run record's architecture check (`checkpoint.run_record.compare`, also made by
`load_checkpoint` itself) compares, which holds every model argument Megatron-LM's check reads:
``num_layers``, ``hidden_size``, ``num_attention_heads`` directly; ``add_position_embedding``
changes no model here (``--no-position-embedding`` is accepted only with rope positions, which
it leaves as they are, and refused otherwise); ``max_position_embeddings``
and ``make_vocab_size_divisible_by`` (which Megatron-LM compares only with a ``--vocab-file``
tokenizer) wherever they change the weights: the maximum positions of learned position
embeddings, and the padded vocabulary; with a ``--vocab-file`` tokenizer both always, as there;
the tokenizer type through the trainer's tokenizer check. It skips what Megatron-LM skips for
dist checkpoints: the TP and PP sizes (checkpoints reshard). It refuses more than Megatron-LM's
check (placement, FFN width, query groups, norm, MoE layout and routing), where Megatron-LM would
fail later on a tensor shape or, with equal shapes, load the weights into another function. A
mismatch names each flag, the two values and the fix.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, Optional, Tuple

from spannorm_megatron.checkpoint import (
    CheckpointError,
    find_latest,
    iteration_dirname,
    read_run_record,
)
from spannorm_megatron.checkpoint.run_record import _ROUTING_FIELDS as ROUTING_FIELDS
from spannorm_megatron.checkpoint.run_record import compare, saved_model_config
from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import flag_of, options
from spannorm_megatron.errors import ConfigError

# ModelConfig fields taken only where the command line (or --config) leaves them unset (None):
# Megatron-LM's _set_arg without force. The dispatcher has a default, so is never taken there
# either.
SIZES = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
         "max_sequence_length", "moe_token_dispatcher_type", "kv_channels")
# ModelConfig fields taken over the command line: Megatron-LM's forced ones that we have...
STRUCTURE = (
    "num_query_groups", "position_embedding_type", "rotary_base", "rotary_percent",
    "add_bias_linear", "swiglu",
    "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization",
    "attention_dropout", "hidden_dropout", "num_experts", "moe_layer_freq",
    "moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax", "moe_grouped_gemm",
    "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
    # ... and the rest of what the architecture check compares (run_record._architecture):
    # the placement's switches and every routing setting it compares.
    "norm_placement", "final_norm", "first_layer_input_norm", "scale_mode", "scale_init",
    "qk_layernorm", "multi_latent_attention", "rope_type", "q_lora_rank", "kv_lora_rank",
    "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rotary_scaling_factor", "mscale",
    "mscale_all_dim",
)
STRUCTURE += tuple(name for name in ROUTING_FIELDS if name not in STRUCTURE)
# Recorded flags of the run (the record's "args") taken the same two ways.
RUN_SIZES = ("seq_length",)
RUN_TOKENIZER = ("tokenizer_type", "tokenizer_model")  # unless its flag is turned off
# With --use-mp-args-from-checkpoint-args: the saved layout (the run record's), over the command
# line.
LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
          "virtual_pipeline_model_parallel_size", "expert_model_parallel_size")

_MODEL_FIELDS = {f.name: f for f in options(ModelConfig)}


def flag_for(name: str) -> str:
    """The flag a user changes to change the architecture entry `name` (see
    run_record._architecture), with the entry's name."""
    if name in _MODEL_FIELDS:
        return f"{flag_of(_MODEL_FIELDS[name])} ({name})"
    return {
        "moe_layer_pattern": "--moe-layer-freq (moe_layer_pattern)",
        "vocab_size": ("vocab_size (the tokenizer's vocabulary padded to a multiple of "
                       "--make-vocab-size-divisible-by x --tensor-model-parallel-size)"),
        "make_vocab_size_divisible_by": "--make-vocab-size-divisible-by",
    }.get(name, name)


def _record(load: Optional[str]) -> Tuple[Optional[dict], str]:
    """(run record, directory) of the checkpoint `load` resumes from; (None, why not) when there
    is none yet or it cannot be read (the load itself then says what is wrong, or starts fresh)."""
    if not load:
        return None, "no --load"
    try:
        iteration = find_latest(load)
        if iteration is None:
            return None, f"no checkpoint in {load} yet"
        directory = os.path.join(load, iteration_dirname(iteration))
        return read_run_record(directory), directory
    except CheckpointError:
        return None, f"the checkpoint in {load} cannot be read (loading it will say why)"


def apply_checkpoint_args(args: argparse.Namespace) -> Dict[str, object]:
    """With ``--use-checkpoint-args``, replace `args`' model flags by the checkpoint's (see the
    module docstring), in place, before `parse_args` checks them. Returns what was taken
    ({dest: value})."""
    if not args.use_checkpoint_args:
        return {}
    if not args.load:
        raise ConfigError("--use-checkpoint-args takes the model's flags from the --load "
                          "checkpoint, and there is no --load: pass --load DIR, or drop "
                          "--use-checkpoint-args.")
    record, where = _record(args.load)
    if record is None or not isinstance(record.get("model_config"), dict):
        why = where if record is None else f"{where} records no model"
        _say(f"> --use-checkpoint-args: {why}; using the flags given")
        return {}
    saved_model = dict(record["model_config"])
    try:  # the resolved width, as Megatron-LM's checkpoint holds it (its validate_args)
        saved_model["ffn_hidden_size"] = saved_model_config(record, where).resolved_ffn_hidden_size
    except CheckpointError:
        pass  # an unreadable record: the check and the load name it
    saved_run = record.get("args") if isinstance(record.get("args"), dict) else {}
    taken = {}

    def take(dest, value, force):
        if value is None and dest not in _MODEL_FIELDS:
            return  # the checkpoint does not say (Megatron-LM keeps the flag then)
        if not force and getattr(args, dest, None) is not None:
            return  # given (the sizes have no default, as in Megatron-LM)
        if getattr(args, dest, None) != value:
            taken[dest] = value
        setattr(args, dest, value)

    for name in SIZES + STRUCTURE:
        if name in saved_model:
            take(name, saved_model[name], force=name in STRUCTURE)
    for name in RUN_SIZES:
        take(name, saved_run.get(name), force=False)
    # Megatron-LM keeps a padded vocabulary taken so (its build_tokenizer pads only when unset);
    # so does arguments.padded_vocab_size.
    take("padded_vocab_size", saved_model.get("vocab_size"), force=False)
    if args.use_tokenizer_model_from_checkpoint_args:
        for name in RUN_TOKENIZER:
            take(name, saved_run.get(name), force=True)
    if args.use_mp_args_from_checkpoint_args:
        layout = record.get("layout") or {}
        for name in LAYOUT:
            take(name, layout.get(name), force=True)
        take("num_layers_per_virtual_pipeline_stage",
             saved_run.get("num_layers_per_virtual_pipeline_stage"), force=False)
    # GQA counts only with --group-query-attention (Megatron-LM's switch, ours too).
    if "num_query_groups" in saved_model:
        args.group_query_attention = saved_model["num_query_groups"] is not None
    if taken:
        shown = ", ".join(_shown(dest, value) for dest, value in taken.items())
        _say(f"> --use-checkpoint-args: from {where}: {shown}")
    return taken


def check_model_matches(job: JobConfig) -> None:
    """Refuse, before anything starts, a resume whose flags describe another model (`job.model`,
    its vocabulary padded) than the checkpoint's (see the module docstring)."""
    model_config = job.model
    record, where = _record(job.checkpoint.load)
    if record is None or not isinstance(record.get("model_config"), dict):
        return
    try:
        saved = saved_model_config(record, where)
    except CheckpointError:
        return  # the load reports the damaged record
    differences, _ = compare(saved, model_config)
    compared = {name for name, _, _ in differences}
    if job.tokenizer.vocab_file:
        # Megatron-LM's check compares these too when the tokenizer has a vocabulary file, where
        # they need not change the weights (the maximum positions of rope, a padding multiple
        # that pads to the same size).
        saved_args = record.get("args") if isinstance(record.get("args"), dict) else {}
        for name, old, new in (
                ("max_sequence_length", saved.max_sequence_length,
                 model_config.max_sequence_length),
                ("make_vocab_size_divisible_by", saved_args.get("make_vocab_size_divisible_by"),
                 job.spellings.make_vocab_size_divisible_by)):
            if old is not None and old != new and name not in compared:
                differences.append((name, old, new))
    if not differences:
        return

    def derived(name):  # a size the run did not set: say so, or the user looks for the flag
        unset = name in _MODEL_FIELDS and getattr(model_config, name) is None
        return " (not set: derived from the other flags)" if unset else ""

    listed = "; ".join(f"{flag_for(name)}: checkpoint {old!r}, this run {new!r}{derived(name)}"
                       for name, old, new in differences)
    if job.checkpoint.use_checkpoint_args:
        fix = ("--use-checkpoint-args keeps the sizes given on the command line, as Megatron-LM "
               "does: drop those flags, or pass the checkpoint's values")
    else:
        fix = ("pass the checkpoint's values, or --use-checkpoint-args to take the model's flags "
               "from the checkpoint")
    raise ConfigError(
        f"--load {job.checkpoint.load}: the checkpoint ({where}) holds another model than these flags "
        f"describe: {listed}. To resume it, {fix}; to train this model instead, start a new run "
        f"without --load in another --save directory.")


def _shown(dest: str, value) -> str:
    field = _MODEL_FIELDS.get(dest)
    if field is not None and field.metadata["negative"]:  # --disable-bias-linear: say the value
        return f"{dest}={value!r}"
    flag = flag_of(field) if field is not None else "--" + dest.replace("_", "-")
    return f"{flag} {value!r}"


def _say(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)

"""A reader of checkpoints that takes from them what Megatron-LM's `load_checkpoint`
(core_v0.16.1, megatron/training/checkpointing.py, torch_dist format) takes, in the same way, so
that the tests can show Megatron-LM would resume ours. Written from that contract, not from its
code; megatron-core's dist_checkpointing (which Megatron-LM calls) does the reading.

What Megatron-LM does with a torch_dist checkpoint, step by step:
1. The save directory's ``latest_checkpointed_iteration.txt`` holds the iteration (an integer;
   or ``release``); the checkpoint is ``iter_%07d`` beside it.
2. Rank 0 reads the common state alone (``dist_checkpointing.load_common_state_dict``: a
   ``torch.load`` restricted to weights and megatron-core's safe classes). ``args`` there is
   an ``argparse.Namespace``; without it Megatron-LM logs "could not find arguments", takes TP
   and PP as 1 and starts the data at sample 0. ``checkpoint_version`` (3.0 for this format)
   and ``iteration`` sit beside it.
3. From ``args``: TP and PP sizes (the RNG states are only asked for when they equal the run's),
   ``world_size`` and ``data_parallel_size``, ``no_save_rng`` and ``no_save_optim`` (whether to
   ask for RNG and optimizer state), then ``check_checkpoint_args`` (ARGS_CHECKED) and the
   position: ``consumed_train_samples``, ``skipped_train_samples``, ``consumed_valid_samples``.
   ``--use-checkpoint-args`` reads ARGS_TAKEN first.
4. The RNG states: one ``ShardedObject('rng_state')`` per (pp, tp) position, global shape
   (PP, TP), when the loading run has expert parallel size 1, or per (pp, tp, dp) position,
   shape (PP, TP, DP), when it has more; of the list loaded it uses entry 0 (without
   ``--data-parallel-random-init``) and calls, on a GPU: ``random.setstate``,
   ``np.random.set_state``, ``torch.set_rng_state``, ``torch.cuda.set_rng_state`` on
   ``cuda_rng_state``, and hands ``rng_tracker_states`` (one per stream) to the tracker, which
   installs each in the CUDA generator when it forks to that stream.
"""

from __future__ import annotations

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import argparse
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

# The arguments load_checkpoint reads (besides the check below).
ARGS_FOR_LOADING = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size",
    "data_parallel_size", "no_save_rng", "no_save_optim", "consumed_train_samples",
    "skipped_train_samples", "consumed_valid_samples",
)
# check_checkpoint_args: always, with a --vocab-file tokenizer, with the features named.
ARGS_CHECKED = (
    "num_layers", "hidden_size", "num_attention_heads", "add_position_embedding",
    "max_position_embeddings", "make_vocab_size_divisible_by", "padded_vocab_size",
    "tokenizer_type", "data_parallel_random_init", "global_batch_size",
)
# load_args_from_checkpoint (--use-checkpoint-args): (name, taken over the command line).
ARGS_TAKEN = (
    ("num_layers", False), ("hidden_size", False), ("ffn_hidden_size", False),
    ("seq_length", False), ("num_attention_heads", False), ("num_query_groups", True),
    ("group_query_attention", True), ("kv_channels", False), ("max_position_embeddings", False),
    ("position_embedding_type", True), ("add_position_embedding", True),
    ("use_rotary_position_embeddings", True), ("rotary_base", True), ("rotary_percent", True),
    ("rotary_interleaved", True), ("add_bias_linear", True), ("add_qkv_bias", True),
    ("squared_relu", True), ("swiglu", True), ("untie_embeddings_and_output_weights", True),
    ("apply_layernorm_1p", True), ("normalization", True),
    ("apply_query_key_layer_scaling", True), ("attention_dropout", True),
    ("hidden_dropout", True), ("hybrid_override_pattern", True), ("spec", True),
    ("hybrid_attention_ratio", True), ("hybrid_mlp_ratio", True), ("num_experts", True),
    ("moe_layer_freq", True), ("moe_ffn_hidden_size", True), ("moe_router_topk", True),
    ("moe_token_dispatcher_type", False), ("moe_router_pre_softmax", True),
    ("moe_grouped_gemm", True), ("moe_shared_expert_intermediate_size", True),
    ("moe_router_score_function", True), ("moe_router_enable_expert_bias", True),
    ("moe_router_topk_scaling_factor", True), ("mamba_state_dim", True),
    ("mamba_head_dim", True), ("mamba_num_groups", True), ("mamba_num_heads", True),
    ("is_hybrid_model", True), ("heterogeneous_layers_config_path", True),
    ("heterogeneous_layers_config_encoded_json", True), ("moe_latent_size", True),
    ("tokenizer_model", True), ("tokenizer_type", True), ("tiktoken_pattern", True),
    ("padded_vocab_size", False), ("ckpt_format", False),
    ("tensor_model_parallel_size", True), ("pipeline_model_parallel_size", True),
    ("virtual_pipeline_model_parallel_size", True),
    ("num_layers_per_virtual_pipeline_stage", False), ("expert_model_parallel_size", True),
)
RNG_KEYS = ("random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
            "rng_tracker_states")
CUDA_STATE_BYTES = 16  # torch's CUDA generator: 64-bit seed and 64-bit Philox offset


@dataclass
class MegatronView:
    """What Megatron-LM's load_checkpoint learns from a checkpoint."""

    directory: str
    iteration: int
    checkpoint_version: float
    args: argparse.Namespace
    content_metadata: Optional[dict]
    rng: Dict[tuple, dict] = field(default_factory=dict)  # shard offset -> entry 0 used


def read(load_dir: str) -> MegatronView:
    """Steps 1-3 of the module docstring: the iteration, the common state and its ``args``."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read().strip())
    directory = os.path.join(load_dir, f"iter_{iteration:07d}")
    common = dist_checkpointing.load_common_state_dict(directory)
    assert isinstance(common.get("args"), argparse.Namespace), \
        f"no argparse.Namespace 'args' in {directory}: {sorted(common)}"
    assert common["iteration"] == iteration
    return MegatronView(directory, iteration, float(common["checkpoint_version"]), common["args"],
                        dist_checkpointing.load_content_metadata(directory))


def missing_arguments(args: argparse.Namespace) -> List[str]:
    """Every argument Megatron-LM reads that `args` lacks (its check reads them without a
    default: a missing one is an AttributeError there)."""
    wanted = ARGS_FOR_LOADING + ARGS_CHECKED + tuple(name for name, _ in ARGS_TAKEN)
    return sorted({name for name in wanted if not hasattr(args, name)})


def check_args(saved: argparse.Namespace, run: argparse.Namespace) -> List[str]:
    """check_checkpoint_args of a dist checkpoint: the mismatches of `run` (a Megatron-LM run's
    arguments) against `saved`."""
    names = ["num_layers", "hidden_size", "num_attention_heads"]
    differ = [n for n in names if getattr(saved, n) != getattr(run, n)]
    if getattr(saved, "add_position_embedding", True) != run.add_position_embedding:
        differ.append("add_position_embedding")
    if getattr(run, "vocab_file", None):
        differ += [n for n in ("max_position_embeddings", "make_vocab_size_divisible_by",
                               "tokenizer_type") if getattr(saved, n) != getattr(run, n)]
    return differ


def take_args(saved: argparse.Namespace, run: argparse.Namespace,
              use_mp_args: bool = False) -> argparse.Namespace:
    """load_args_from_checkpoint: `run` with the checkpoint's arguments (a forced one replaces
    the command line's, the others fill what it left as None; a None in the checkpoint is
    never taken)."""
    out = argparse.Namespace(**vars(run))
    parallel = {"tensor_model_parallel_size", "pipeline_model_parallel_size",
                "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                "expert_model_parallel_size"}
    for name, force in ARGS_TAKEN:
        if name in parallel and not use_mp_args:
            continue
        value = getattr(saved, name, None)
        if value is not None and (force or getattr(out, name, None) is None):
            setattr(out, name, value)
    return out


def read_rng(view: MegatronView, expert_model_parallel_size: int) -> Dict[tuple, dict]:
    """Step 4 for every rank of a run with the checkpoint's TP, PP and DP sizes and the given
    EP size (call with a process group up; one process may read every rank's shard): each rank's
    entry 0, keyed by its shard offset. Empty when Megatron-LM would not ask (no_save_rng)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    args = view.args
    if getattr(args, "no_save_rng", False):
        return {}
    pp, tp, dp = (args.pipeline_model_parallel_size, args.tensor_model_parallel_size,
                  args.data_parallel_size)
    per_rank = expert_model_parallel_size > 1
    offsets = [(p, t, d) if per_rank else (p, t) for p in range(pp) for t in range(tp)
               for d in (range(dp) if per_rank else [0])]
    shape = (pp, tp, dp) if per_rank else (pp, tp)
    # All ranks' requests in one load: together they cover the object's every shard, which
    # megatron-core checks of a load as of a save.
    request = {offset: ShardedObject("rng_state", None, shape, offset, replica_id=0)
               for offset in offsets}
    loaded = dist_checkpointing.load(request, view.directory)
    view.rng = {offset: loaded[offset][0] for offset in offsets}
    return view.rng


def rng_entry_problems(entry: dict) -> List[str]:
    """Why Megatron-LM's calls on a GPU would fail on this entry (none of them needs a GPU to
    be checked: the CUDA generator takes a CPU byte tensor of 16 bytes, or 8, seed only)."""
    problems = [f"no {key}" for key in RNG_KEYS if key not in entry]
    if problems:
        return problems
    for name, state in [("cuda_rng_state", entry["cuda_rng_state"])] + [
            (f"rng_tracker_states[{k}]", v) for k, v in entry["rng_tracker_states"].items()]:
        if not isinstance(state, torch.Tensor):
            problems.append(f"{name} is {type(state).__name__}, not a tensor")
        elif state.dtype != torch.uint8 or state.device.type != "cpu" \
                or state.numel() not in (8, CUDA_STATE_BYTES):
            problems.append(f"{name} is not a CUDA generator state ({state.dtype}, "
                            f"{state.numel()} elements on {state.device})")
    if not entry["rng_tracker_states"]:
        problems.append("rng_tracker_states is empty (Megatron-LM stops: 'Unable to load rng')")
    return problems

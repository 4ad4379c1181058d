"""Hugging Face folder -> megatron dist checkpoint (the engine of tools/convert_from_hf.py).

Accepted: `LlamaForCausalLM`, `MixtralForCausalLM`, `Qwen2MoeForCausalLM` (in the forms the
export writes and megatron can express: see `families.model_config_from_hf` for what is refused)
and our `SpanNormForCausalLM` (whose config.json carries the exact `ModelConfig`). Weights are
read from ``model.safetensors`` or its sharded index, lazily, one layer at a time.

Every rank of the target layout (TP x PP x EP, launched by torchrun; one process for TP1/PP1)
builds its own model shard, and fills each of its tensors with the matching slice of the
global megatron tensor computed from the HF weights, using the model's own sharded state dict
(the same description megatron-core's dist checkpointing loads and saves with), so every
layout, SwiGLU's split fc1 and expert parallelism included, is handled by megatron-core's own
sharding. The result is saved with `spannorm_megatron.checkpoint.save_checkpoint` (iteration 0
by default, no optimizer or RNG state): training loads it with ``--no-load-optim``
(`load_checkpoint(..., no_load_optim=True)` or ``finetune=True``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Dict, List, Tuple

import torch

from spannorm_megatron.config import ModelConfig, ParallelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.families import (
    HFSource,
    embedding_from_hf,
    final_from_hf,
    layer_from_hf,
    model_config_from_hf,
)
from spannorm_megatron.hf.layout import CheckpointLayout, Group, megatron_groups
from spannorm_megatron.hf.safetensors_io import SafetensorsFolder

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise ConversionError(f"Hugging Face folder {directory} does not exist.")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{directory} is not a Hugging Face model folder: it has no "
                              f"config.json.") from None
    except ValueError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


class HFCheckpoint:
    """An HF folder checked against the megatron model it converts to."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.hf_config = read_hf_config(self.directory)
        where = os.path.join(self.directory, "config.json")
        self.family, self.config = model_config_from_hf(self.hf_config, where)
        self.weights = SafetensorsFolder(self.directory)
        self._check_names()

    def _expected(self) -> Dict[str, Tuple[int, ...]]:
        from spannorm_megatron.hf.export import plan_hf_tensors

        plan = plan_hf_tensors(self.family, self.config, megatron_groups(self.config),
                               torch.float32)
        return {name: shape for _group, entries in plan for name, shape, _dtype in entries}

    def _check_names(self) -> None:
        expected = self._expected()
        present = {n for n in self.weights.names() if not n.endswith(IGNORED_SUFFIXES)}
        optional = set()
        if self.family.zero_qkv_bias and not self.config.add_bias_linear:
            optional = {n for n in expected if n.endswith(("q_proj.bias", "k_proj.bias",
                                                            "v_proj.bias"))}
        if not self.config.untie_embeddings_and_output_weights:
            optional.add("lm_head.weight")  # tied: a folder may store the copy
            expected.setdefault("lm_head.weight", (self.config.vocab_size, self.config.hidden_size))
        missing = sorted(set(expected) - present - optional)
        unexpected = sorted(present - set(expected))
        wrong = sorted(f"{n} {self.weights.shape(n)} (expected {expected[n]})"
                       for n in present & set(expected) if self.weights.shape(n) != expected[n])
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"lacks {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
            if unexpected:
                parts.append(f"has weights the {self.family.architecture} config does not "
                             f"explain: {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
            if wrong:
                parts.append(f"has other shapes: {wrong[:8]}")
            raise ConversionError(f"{self.directory}: the weights do not match config.json: "
                                  + "; ".join(parts) + ".")

    def megatron_group(self, group: Group) -> Dict[str, torch.Tensor]:
        """The megatron tensors of one group (full TP1 names), computed from the HF weights."""
        src = HFSource(self.weights.get, self.weights.names())
        if group.layer is not None:
            local = layer_from_hf(self.family, self.config, group.layer, src)
            prefix = f"decoder.layers.{group.layer}."
            return {prefix + k: v for k, v in local.items()}
        if group.name == "embedding":
            return embedding_from_hf(self.config, src)
        return final_from_hf(self.config, src)

    def megatron_state(self) -> Dict[str, torch.Tensor]:
        state = {}
        for group in megatron_groups(self.config):
            state.update(self.megatron_group(group))
        return state


def _nested_sharded_tensors(value, path=()):
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(value, ShardedBase):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nested_sharded_tensors(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nested_sharded_tensors(v, path + (i,))


def _set_path(root, path, value):
    for key in path[:-1]:
        root = root[key]
    if value is None:
        del root[path[-1]]
    else:
        root[path[-1]] = value


def fill_model_chunks(chunks, hf: HFCheckpoint, dtype: torch.dtype,
                      log: Callable[[str], None] = lambda s: None) -> None:
    """Load this rank's model chunks from the HF weights (any TP/PP/EP layout)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges

    from spannorm_megatron.checkpoint import state as ckpt_state

    layout = CheckpointLayout(hf.config)
    inverse = layout.inverse()
    group_of = {name: group for group in layout.groups for name, _shape in group.params}
    sharded = ckpt_state.model_state(chunks, ckpt_state.SHARDING_METADATA)
    preprocessed, _nonpersistent, factories = load_preprocess(sharded)

    # Which megatron tensor each sharded tensor is a slice of, grouped for one pass per group.
    requests: Dict[str, List[tuple]] = {}
    for path, item in list(_nested_sharded_tensors(preprocessed)):
        if isinstance(item, ShardedObject) or "_extra_state" in item.key:
            _set_path(preprocessed, path, None)
            continue
        if not isinstance(item, ShardedTensor) or item.flattened_range is not None:
            raise ConversionError(f"internal: unexpected sharded item {item.key}")
        index = tuple(item.global_offset[:item.prepend_axis_num])
        name = inverse.get((item.key, index))
        if name is None:
            raise ConversionError(f"internal: no megatron name for checkpoint key {item.key} "
                                  f"at {index}")
        requests.setdefault(group_of[name].name, []).append((path, item, name))

    # The sharded tensors' data are views of the model's parameters (SwiGLU's factory chunks
    # them): filling them in place loads the model without a second copy of it. Should a view
    # ever be a copy, the values go through megatron-core's factory merge and load_state_dict.
    params = [p for chunk in chunks for p in ckpt_state.unwrap(chunk).parameters()]
    storages = {p.untyped_storage().data_ptr() for p in params}
    in_place = all(item.data.untyped_storage().data_ptr() in storages
                   for items in requests.values() for _path, item, _name in items)

    groups = {g.name: g for g in layout.groups}
    with torch.no_grad():
        for group_name, items in requests.items():
            t0 = time.perf_counter()
            full = hf.megatron_group(groups[group_name])
            for path, item, name in items:
                tensor = full[name]
                slices = tuple(slice(off, off + size) for off, size in
                               zip(item.global_offset[item.prepend_axis_num:], item.local_shape))
                if in_place:
                    item.data.copy_(tensor[slices])
                else:
                    _set_path(preprocessed, path, tensor[slices].to(dtype).clone())
            del full
            log(f"[convert_from_hf] {group_name:>10}: {len(items)} tensor slice(s) "
                f"({time.perf_counter() - t0:.2f}s)")
    if in_place:
        return
    loaded = apply_factory_merges(preprocessed, factories)
    for key, chunk in zip(sharded, chunks):
        missing, unexpected = ckpt_state.unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if "_extra_state" not in k]
        if missing or unexpected:
            raise ConversionError(f"internal: model load mismatch: missing {missing}, "
                                  f"unexpected {unexpected}")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def convert_hf_to_megatron(
    load: str,
    save: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    dtype: str = "float32",
    iteration: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Convert the HF folder `load` into a megatron checkpoint under `save`; call on every rank.
    Returns the checkpoint's iteration directory."""
    from spannorm_megatron.hf.export import parse_dtype

    params_dtype = parse_dtype(dtype)
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    world = _world_size()
    if world % (tp * pp):
        raise ConversionError(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not "
            f"fit {world} process(es): launch with torchrun --nproc_per_node {tp * pp} (or a "
            f"multiple), or run TP1/PP1 in a single process.")
    save = os.path.abspath(save)
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConversionError(f"--save {save} exists and is not a directory.")
    if os.path.isdir(save) and os.listdir(save) and not overwrite:
        raise ConversionError(f"--save {save} exists and is not empty; pass --overwrite to save "
                              f"iteration {iteration} into it, or choose another directory.")
    created = not os.path.exists(save)

    rank = int(os.environ.get("RANK", "0"))
    say = log if rank == 0 else (lambda s: None)
    say(f"[convert_from_hf] checking {load}")
    hf = HFCheckpoint(load)
    config = hf.config
    if config.is_moe and config.num_experts % ep:
        raise ConversionError(f"--expert-model-parallel-size {ep} does not divide "
                              f"num_experts={config.num_experts}.")
    say(f"[convert_from_hf] {hf.family.architecture}: {config.norm_placement}, "
        f"{config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
        + (f", {config.num_experts} experts" if config.is_moe else "")
        + f" -> TP{tp} PP{pp}" + (f" EP{ep}" if ep > 1 else "") + f" ({dtype})")

    from spannorm_megatron.hf.megatron_reader import local_model_config
    from spannorm_megatron.model import build_model, transformer_config
    from spannorm_megatron.runtime import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    initialize(**parallel.runtime_kwargs())
    local = local_model_config(config)
    overrides = dict(parallel.transformer_kwargs(), params_dtype=params_dtype)
    if params_dtype == torch.bfloat16:
        overrides["bf16"] = True
    elif params_dtype == torch.float16:
        overrides["fp16"] = True
    chunks = build_model(local, transformer_config(local, **overrides))
    fill_model_chunks(chunks, hf, params_dtype, log=say)
    try:
        path = _save(save, iteration, chunks, config, parallel, load)
    except BaseException:
        if created and rank == 0:
            shutil.rmtree(save, ignore_errors=True)
        raise
    say(f"[convert_from_hf] wrote {path}")
    return path


def _save(save: str, iteration: int, chunks, config: ModelConfig, parallel: ParallelConfig,
          source: str) -> str:
    try:
        from spannorm_megatron.checkpoint import save_checkpoint
    except ImportError:  # pragma: no cover - fallback while the checkpoint package is absent
        return _save_plain(save, iteration, chunks)
    return save_checkpoint(
        save, iteration, chunks, None, None, model_config=config, parallel_config=parallel,
        consumed_train_samples=0, no_save_rng=True,
        args={"converted_from_hf": os.path.abspath(source)})


def _save_plain(save: str, iteration: int, chunks) -> str:  # pragma: no cover
    from megatron.core import dist_checkpointing

    path = os.path.join(save, f"iter_{iteration:07d}")
    os.makedirs(path, exist_ok=True)
    sharded = {("model" if len(chunks) == 1 else f"model{i}"): c.sharded_state_dict()
               for i, c in enumerate(chunks)}
    dist_checkpointing.save(sharded, path)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{iteration}\n")
    return path

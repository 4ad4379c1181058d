"""Hugging Face folder -> megatron dist checkpoint (the engine of tools/convert_from_hf.py).

Accepted: `LlamaForCausalLM`, `MixtralForCausalLM`, `Qwen2MoeForCausalLM` (in the forms the
export writes and megatron can express: see `families.model_config_from_hf` for what is refused)
and our `SpanNormForCausalLM` (whose config.json carries the exact `ModelConfig`). Weights are
read from ``model.safetensors`` or its sharded index, lazily, one layer at a time.

Every rank of the target layout (TP x PP x EP, launched by torchrun; one process for TP1/PP1)
builds its model shard on the meta device and saves it with a streaming torch_dist writer
(`checkpoint.streaming.StreamingSaveStrategy`): the model's own sharded state dict (the same
description megatron-core's dist checkpointing loads and saves with) says which slice of which
global megatron tensor each shard is, so every layout, SwiGLU's split fc1 and expert parallelism
included, is handled by megatron-core's own sharding; each slice is cut, when the writer reaches
it, from the group (embedding, one layer, final) converted from the HF weights last. A process
holds one group, not the model. The result is a `spannorm_megatron.checkpoint` checkpoint
(iteration 0 by default, no optimizer or RNG state): training loads it with ``--no-load-optim``
(`load_checkpoint(..., no_load_optim=True)` or ``finetune=True``).

The folder's tokenizer files are copied, unchanged, into ``SAVE/tokenizer`` and the run record
names that folder (`HF_TOKENIZER_KEY`): the export, evaluation and generation of the checkpoint
use it as a HuggingFaceTokenizer unless given another, so HF -> megatron -> HF gives back the
same tokenizer files. Training is not bound to it (a run records the tokenizer it was given).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from spannorm_megatron.checkpoint import TRACKER_FILENAME, iteration_dirname, save_checkpoint
from spannorm_megatron.checkpoint.streaming import StreamingSaveStrategy
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.data.tokenizer_args import HF_TOKENIZER_KEY
from spannorm_megatron.hf.destination import IMPORT_MARKER, check_destination, write_marker
from spannorm_megatron.hf.errors import ConversionError, tensor_mismatches
from spannorm_megatron.hf.families import model_config_from_hf
from spannorm_megatron.hf.layout import CheckpointLayout, Group, megatron_groups
from spannorm_megatron.runtime import launch_environment
from spannorm_megatron.hf.records import check_records_agree
from spannorm_megatron.hf.safetensors_io import SafetensorsFolder
from spannorm_megatron.hf.tensors import count_non_finite

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TOKENIZER_DIRNAME = "tokenizer"
"""Where the HF folder's tokenizer files go, inside the save directory."""


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
    """An HF folder checked against the megatron model it converts to: config.json (what
    transformers reads) is the truth, and a record of the model beside it (our class's
    `megatron_model_config`, the export's marker) must agree with it; the weights must match it
    and, unless `allow_non_finite`, hold no NaN/Inf."""

    def __init__(self, directory: str, allow_non_finite: bool = False):
        self.directory = os.path.abspath(directory)
        self.hf_config = read_hf_config(self.directory)
        where = os.path.join(self.directory, "config.json")
        self.family, self.config = model_config_from_hf(self.hf_config, where)
        check_records_agree(self.family, self.hf_config, self.directory)
        self.weights = SafetensorsFolder(self.directory)
        self._check_names()
        if not allow_non_finite:
            self._check_finite()

    def _expected(self) -> Dict[str, Tuple[int, ...]]:
        from spannorm_megatron.hf.export import plan_hf_tensors

        plan = plan_hf_tensors(self.family, self.config, megatron_groups(self.config),
                               torch.float32)
        return {name: shape for _group, entries in plan for name, shape, _dtype in entries}

    def _check_names(self) -> None:
        expected = self._expected()
        present = {n for n in self.weights.names() if not n.endswith(IGNORED_SUFFIXES)}
        optional = set(self.family.optional_hf_names(self.config))
        if not self.config.untie_embeddings_and_output_weights:
            optional.add("lm_head.weight")  # tied: a folder may store the copy
            expected.setdefault("lm_head.weight", (self.config.vocab_size, self.config.hidden_size))
        parts = tensor_mismatches(
            expected, {name: self.weights.shape(name) for name in present}, optional=optional,
            unexpected_are=f"weights the {self.family.architecture} config does not explain")
        if parts:
            raise ConversionError(f"{self.directory}: the weights do not match config.json: "
                                  + "; ".join(parts) + ".")

    def _check_finite(self) -> None:
        """Before anything is written (a writer's failure would come wrapped in its own), one
        tensor in memory at a time."""
        for name in sorted(self.weights.names()):
            tensor = self.weights.get(name)
            bad = count_non_finite(tensor)
            if bad:
                raise ConversionError(
                    f"{self.directory}: {name} holds {bad} non-finite value(s) (NaN/Inf) of "
                    f"{tensor.numel()}: the converted model would compute NaN. Convert a folder "
                    f"saved before the weights diverged, or pass --allow-non-finite to convert "
                    f"it as it is.")
            del tensor
            self.weights.release()

    def megatron_group(self, group: Group) -> Dict[str, torch.Tensor]:
        """The megatron tensors of one group (full TP1 names), computed from the HF weights."""
        return self.family.from_hf(self.config, group, self.weights.get)

    def megatron_state(self) -> Dict[str, torch.Tensor]:
        state = {}
        for group in megatron_groups(self.config):
            state.update(self.megatron_group(group))
        return state


class GroupProducer:
    """Produces each checkpoint shard of the target layout from the HF weights, converting one
    tensor group (embedding, a layer, final) at a time and holding only that group."""

    def __init__(self, hf: HFCheckpoint, log: Callable[[str], None] = lambda s: None):
        layout = CheckpointLayout(hf.config)
        self._hf = hf
        self._log = log
        self._name_of = layout.inverse()
        self._group_of = {name: (position, group) for position, group in enumerate(layout.groups)
                          for name, _shape in group.params}
        self._cached_group: Optional[str] = None
        self._cached: Dict[str, torch.Tensor] = {}

    def _name(self, shard) -> str:
        if shard.flattened_range is not None:
            raise ConversionError(f"internal: flattened sharded tensor {shard.key}")
        name = self._name_of.get((shard.key, tuple(shard.global_offset[:shard.prepend_axis_num])))
        if name is None:
            raise ConversionError(f"internal: no megatron name for checkpoint key {shard.key} "
                                  f"at {tuple(shard.global_offset[:shard.prepend_axis_num])}")
        return name

    def order(self, shard) -> int:
        """The position of the shard's group: the writer visits groups in this order."""
        return self._group_of[self._name(shard)][0]

    def produce(self, shard) -> torch.Tensor:
        """The slice of the global megatron tensor that `shard` (a ShardedTensor) describes."""
        name = self._name(shard)
        _position, group = self._group_of[name]
        if group.name != self._cached_group:
            self._cached_group, self._cached = None, {}  # let the last group go first
            start = time.perf_counter()
            self._cached = self._hf.megatron_group(group)
            self._hf.weights.release()
            self._cached_group = group.name
            self._log(f"[convert_from_hf] {group.name:>10}: converted "
                      f"({time.perf_counter() - start:.2f}s)")
        offsets = shard.global_offset[shard.prepend_axis_num:]
        return self._cached[name][tuple(slice(offset, offset + size) for offset, size
                                        in zip(offsets, shard.local_shape))]


def _world_size() -> int:
    return launch_environment().world_size


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
    allow_non_finite: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """Convert the HF folder `load` into a megatron checkpoint under `save`; call on every rank.
    Returns the checkpoint's iteration directory."""
    from spannorm_megatron.hf.export import parse_dtype

    params_dtype = parse_dtype(dtype)
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    world = _world_size()
    if world % (tp * pp):
        flags = [f"--load {load}", f"--save {save}"] + [
            f"{flag} {value}" for flag, value, default in (
                ("--tensor-model-parallel-size", tp, 1),
                ("--pipeline-model-parallel-size", pp, 1),
                ("--expert-model-parallel-size", ep, 1), ("--dtype", dtype, "float32"),
                ("--iteration", iteration, 0)) if value != default]
        flags += [flag for flag, on in (("--overwrite", overwrite),
                                        ("--allow-non-finite", allow_non_finite)) if on]
        raise ConversionError(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not "
            f"fit {world} process(es): each rank writes its own part of the files. Run: "
            f"torchrun --standalone --nproc_per_node {tp * pp} tools/convert_from_hf.py "
            + " ".join(flags) + ". Or convert in one process without the layout flags: the "
            "checkpoint reshards, so a TP1/PP1 one trains under any layout.")
    save = check_destination(save, overwrite, f"save iteration {iteration} into it",
                             source=load, marker=IMPORT_MARKER)
    created = not os.path.exists(save)

    rank = launch_environment().rank
    say = log if rank == 0 else (lambda s: None)
    say(f"[convert_from_hf] checking {load}")
    hf = HFCheckpoint(load, allow_non_finite=allow_non_finite)
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
    from spannorm_megatron.process import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    initialize(parallel)
    local = local_model_config(config)
    overrides = dict(parallel.transformer_kwargs(), params_dtype=params_dtype)
    if params_dtype == torch.bfloat16:
        overrides["bf16"] = True
    elif params_dtype == torch.float16:
        overrides["fp16"] = True
    # The model is built on the meta device: it only describes the checkpoint (names, shapes,
    # this rank's slices); the tensors are converted group by group while the file is written.
    with torch.device("meta"):
        chunks = build_model(local, transformer_config(
            local, **overrides, use_cpu_initialization=True, perform_initialization=False))
    for chunk in chunks:
        for module in chunk.modules():
            # megatron-core allocates the router's expert bias on the current device itself,
            # past the meta context; its converted value is written like every weight.
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor) and not bias.is_meta:
                module.expert_bias = bias.to("meta")
    materialized = [name for chunk in chunks for name, tensor in chunk.state_dict().items()
                    if isinstance(tensor, torch.Tensor) and not tensor.is_meta]
    if materialized:  # they would be written as built, not converted
        raise ConversionError(f"internal: built off the meta device: {materialized[:4]}")
    producer = GroupProducer(hf, log=say)
    tokenizer_files = _tokenizer_files(load)
    args = {"converted_from_hf": os.path.abspath(load)}
    if tokenizer_files:
        args[HF_TOKENIZER_KEY] = os.path.join(save, TOKENIZER_DIRNAME)
    if rank == 0:
        # Marked before anything else is written, so that a rerun with --overwrite recognises
        # even a killed conversion's directory as its own.
        os.makedirs(save, exist_ok=True)
        write_marker(save, IMPORT_MARKER, {"converted_from_hf": os.path.abspath(load)},
                     entries=(TRACKER_FILENAME, iteration_dirname(iteration))
                     + ((TOKENIZER_DIRNAME,) if tokenizer_files else ()))
    try:
        if rank == 0 and tokenizer_files:
            _copy_tokenizer(load, tokenizer_files, args[HF_TOKENIZER_KEY])
            say(f"[convert_from_hf] tokenizer: {', '.join(tokenizer_files)} -> "
                f"{args[HF_TOKENIZER_KEY]}")
        path = save_checkpoint(
            save, iteration, chunks, None, None, model_config=config, parallel_config=parallel,
            consumed_train_samples=0, no_save_rng=True, args=args,
            sharded_strategy=StreamingSaveStrategy(producer.produce, producer.order))
    except BaseException:
        if created and rank == 0:
            shutil.rmtree(save, ignore_errors=True)
        raise
    say(f"[convert_from_hf] wrote {path}")
    return path


def _tokenizer_files(folder: str) -> Tuple[str, ...]:
    """The HF folder's tokenizer files; none when it has no tokenizer (a model-only folder)."""
    from spannorm_megatron.config.tokenizer_files import hf_tokenizer_files
    from spannorm_megatron.errors import TokenizerError

    try:
        return tuple(hf_tokenizer_files(folder))
    except TokenizerError:
        return ()


def _copy_tokenizer(folder: str, names, destination: str) -> None:
    """The files as they are (an earlier conversion's copy, listed in its marker, replaced)."""
    if os.path.isdir(destination):
        shutil.rmtree(destination)
    os.makedirs(destination)
    for name in names:
        shutil.copyfile(os.path.join(folder, name), os.path.join(destination, name))

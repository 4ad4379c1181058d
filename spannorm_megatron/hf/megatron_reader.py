"""Reading the model weights of a megatron-core dist checkpoint, one tensor group at a time.

A dist checkpoint (torch_dist format, any TP / PP / EP / VPP layout) stores every parameter as
slices of a global tensor (see `layout.py`). `MegatronCheckpoint.read(names)` reads exactly the
slices that make up the requested TP1/PP1 tensors through PyTorch Distributed Checkpoint's own
resharding (its `FileSystemReader` and `create_read_items_for_chunk_list`), so a conversion
holds one layer's tensors at a time, never the whole model, and needs no process group.

`load_megatron_state(ckpt_dir)` -> (ModelConfig, full state dict) is the one-call form;
`load_megatron_model` puts that state into a single-process megatron model.

What can be pointed at: a save directory (``latest_checkpointed_iteration.txt`` + ``iter_*``,
spannorm_megatron.checkpoint's layout; the pointer's iteration is read), one ``iter_NNNNNNN``
directory, or a bare dist-checkpoint directory (``.metadata`` + ``*.distcp``, e.g. written by
``megatron.core.dist_checkpointing.save``). The model config comes from the checkpoint's run
record (``run.json``) unless one is given (``--model-config``), which bare directories need.

Before anything is converted the checkpoint is checked: complete (``manifest.json`` when the
checkpoint package wrote it, with sizes and checksums), every shard file the metadata names
present and long enough, and its tensors exactly those of the model config.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.paths import DIST_CHECKPOINT_METADATA
from spannorm_megatron.hf.errors import ConversionError, tensor_mismatches
from spannorm_megatron.hf.layout import CheckpointLayout, Group, is_model_tensor_key

DCP_METADATA = DIST_CHECKPOINT_METADATA
ConfigSource = Union[None, ModelConfig, dict, str, os.PathLike]


def _checkpoint_package():
    """spannorm_megatron.checkpoint, or None while it does not exist."""
    try:
        from spannorm_megatron import checkpoint
    except ImportError:  # pragma: no cover - the package is being written concurrently
        return None
    return checkpoint


def resolve_checkpoint_dir(path: Union[str, os.PathLike]) -> str:
    """The directory holding the dist checkpoint (``.metadata``) that `path` designates."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ConversionError(f"Checkpoint directory {path} does not exist.")
    ckpt = _checkpoint_package()
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        if ckpt is not None and os.path.isfile(os.path.join(path, ckpt.RUN_RECORD_FILENAME)):
            from spannorm_megatron.checkpoint import manifest

            if not manifest.is_complete(path):
                raise ConversionError(
                    f"{path} is incomplete (no {ckpt.MANIFEST_FILENAME}: the save that wrote it "
                    f"did not finish); convert another iteration.")
        return path
    if ckpt is not None:
        from spannorm_megatron.checkpoint import tracker
        from spannorm_megatron.checkpoint.naming import iteration_dirs

        if os.path.isfile(os.path.join(path, ckpt.TRACKER_FILENAME)) or iteration_dirs(path):
            try:
                _iteration, resolved = tracker.resolve(path)
            except ValueError as err:
                raise ConversionError(str(err)) from None
            return resolved
    raise ConversionError(
        f"{path} is not a megatron checkpoint: it has no {DCP_METADATA} (a dist-checkpoint "
        f"directory) and no latest_checkpointed_iteration.txt or iter_NNNNNNN directories (a "
        f"save directory).")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist.") from None
    except ValueError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def model_config_from(source: ConfigSource) -> Optional[ModelConfig]:
    """A ModelConfig from a ModelConfig, a dict, or a JSON file (a ModelConfig dict, or a run
    record / HF config holding one under ``model_config`` / ``megatron_model_config``)."""
    if source is None or isinstance(source, ModelConfig):
        return source
    values = source if isinstance(source, dict) else _read_json(os.fspath(source))
    for key in ("model_config", "megatron_model_config"):
        if isinstance(values.get(key), dict):
            values = values[key]
            break
    from dataclasses import fields

    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConversionError(f"Model config {source if not isinstance(source, dict) else ''} "
                              f"has unknown field(s) {unknown}; known: {sorted(known)}.")
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ConversionError(f"Model config is not valid: {err}") from None


def _recorded_config(directory: str) -> Tuple[Optional[ModelConfig], Optional[dict]]:
    """(ModelConfig, run record) saved with the checkpoint, (None, None) without a record."""
    ckpt = _checkpoint_package()
    record = None
    if ckpt is not None and os.path.isfile(os.path.join(directory, ckpt.RUN_RECORD_FILENAME)):
        try:
            record = ckpt.read_run_record(directory)
        except ValueError as err:
            raise ConversionError(str(err)) from None
    elif os.path.isfile(os.path.join(directory, "common.pt")):
        try:
            common = torch.load(os.path.join(directory, "common.pt"), map_location="cpu",
                                weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable common state just has no record
            common = None
        if isinstance(common, dict) and isinstance(common.get("run"), dict):
            record = common["run"]
    if record is None or not isinstance(record.get("model_config"), dict):
        return None, record
    from dataclasses import fields

    known = {f.name for f in fields(ModelConfig)}
    try:
        config = ModelConfig.from_dict({k: v for k, v in record["model_config"].items()
                                        if k in known})
    except ValueError as err:
        raise ConversionError(f"The model config recorded in {directory} is not valid: {err}") \
            from None
    return config, record


def _check_same_model(recorded: ModelConfig, given: ModelConfig, directory: str) -> None:
    """A given model config may change what does not alter the trained function (a dispatcher,
    a loss weight), never what does: the tensors would be read as another model's, or the same
    weights routed another way (the run record's comparison, the one a resume makes)."""
    from spannorm_megatron.checkpoint.run_record import compare

    different, _ = compare(recorded, given)
    if different:
        settings = "; ".join(f"{name}: checkpoint {saved!r}, --model-config {wanted!r}"
                             for name, saved, wanted in different)
        raise ConversionError(
            f"--model-config describes another model than the one {directory} was trained as "
            f"({settings}). Drop --model-config: the checkpoint's run record (run.json) "
            f"describes it.")


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


class _SliceLoadPlanner:
    """A DCP LoadPlanner that reads given slices of global tensors into given buffers."""

    def __init__(self, requests: Dict[str, List[Tuple[Tuple[int, ...], torch.Tensor]]]):
        # fqn -> [(global offsets, buffer shaped like the slice)]
        self.requests = requests
        self.metadata = None

    # LoadPlanner protocol -------------------------------------------------------------------
    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata = metadata

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for fqn, slices in self.requests.items():
            md = self.metadata.state_dict_metadata[fqn]
            chunks = [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buffer.shape)
                      for offsets, buffer in slices]
            items += create_read_items_for_chunk_list(fqn, md, chunks)
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):  # pragma: no cover - only tensors are requested
        raise ConversionError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        offsets = tuple(read_item.dest_index.offset)
        for chunk_offsets, buffer in self.requests[read_item.dest_index.fqn]:
            if tuple(chunk_offsets) == offsets:
                return _narrow(buffer, read_item.dest_offsets, read_item.lengths)
        raise AssertionError(f"no buffer for {read_item.dest_index}")

    def commit_tensor(self, read_item, tensor):
        pass


class MegatronCheckpoint:
    """A checked megatron dist checkpoint whose model tensors can be read group by group.

    Args:
        path: save directory, iteration directory or bare dist-checkpoint directory.
        model_config: overrides the run record's (ModelConfig, dict or JSON path); required when
            the checkpoint has no record.
        verify_checksums: with a manifest (checkpoint package), also compare CRC-32s (reads
            the checkpoint once); sizes are always checked.
    """

    def __init__(self, path, model_config: ConfigSource = None, verify_checksums: bool = True):
        from torch.distributed.checkpoint import FileSystemReader

        self.directory = resolve_checkpoint_dir(path)
        recorded, self.run_record = _recorded_config(self.directory)
        given = model_config_from(model_config)
        if given is None and recorded is None:
            raise ConversionError(
                f"{self.directory} has no run record with the model config (run.json): pass "
                f"the model config as JSON (--model-config FILE: a ModelConfig dict, or a run "
                f"record holding one under 'model_config').")
        if given is not None and recorded is not None:
            _check_same_model(recorded, given, self.directory)
        self.config: ModelConfig = given if given is not None else recorded
        self._check_manifest(verify_checksums)
        self.reader = FileSystemReader(self.directory)
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as err:  # noqa: BLE001 - any unreadable metadata is a damaged checkpoint
            raise ConversionError(
                f"{self.directory}/{DCP_METADATA} cannot be read ({type(err).__name__}: {err}); "
                f"the checkpoint is damaged.") from None
        self._check_files()
        self.layout = CheckpointLayout(self.config)
        self._check_tensors()
        self.reader.set_up_storage_reader(self.metadata, True)

    # ------------------------------------------------------------------------------- checks
    def _check_manifest(self, verify_checksums: bool) -> None:
        ckpt = _checkpoint_package()
        if ckpt is None:
            return
        from spannorm_megatron.checkpoint import manifest

        files = manifest.read(self.directory)
        if files is None:
            return
        bad = manifest.problems(self.directory, files, checksums=verify_checksums)
        if bad:
            raise ConversionError(f"{self.directory} is damaged: " + "; ".join(bad[:8])
                                  + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
                                  + ". Convert another iteration.")

    def _check_files(self) -> None:
        needed: Dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        missing, short = [], []
        for rel, end in sorted(needed.items()):
            full = os.path.join(self.directory, rel)
            if not os.path.isfile(full):
                missing.append(rel)
            elif os.path.getsize(full) < end:
                short.append(f"{rel} ({os.path.getsize(full)} bytes, needs {end})")
        if missing or short:
            parts = []
            if missing:
                parts.append(f"missing shard file(s) {missing}")
            if short:
                parts.append(f"truncated shard file(s) {short}")
            raise ConversionError(
                f"{self.directory} is incomplete: {'; '.join(parts)}. The checkpoint was copied "
                f"partially or its save was interrupted; copy every file of the directory (or "
                f"convert another iteration).")

    def _check_tensors(self) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        stored = {key: tuple(md.size) for key, md in self.metadata.state_dict_metadata.items()
                  if isinstance(md, TensorStorageMetadata) and is_model_tensor_key(key)}
        expected = self.layout.expected_keys()
        parts = tensor_mismatches(expected, stored,
                                  unexpected_are="tensors the model config does not")
        if parts:
            raise ConversionError(
                f"{self.directory} does not hold the model described by its config "
                f"(norm_placement={self.config.norm_placement!r}, {self.config.num_layers} layers, "
                f"hidden {self.config.hidden_size}): it {'; '.join(parts)}. Pass the config it "
                f"was trained with (--model-config), or update the export rule of a placement "
                f"whose norms changed (spannorm_megatron/hf/rules.py).")

    # -------------------------------------------------------------------------------- reading
    @property
    def groups(self) -> List[Group]:
        return self.layout.groups

    def dtype_of(self, name: str) -> torch.dtype:
        key = self.layout.location(name).key
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, params: Iterable[Tuple[str, Tuple[int, ...]]]) -> Dict[str, torch.Tensor]:
        """The TP1 tensors (name, shape) in their stored dtype, read in one pass."""
        requests: Dict[str, List[Tuple[Tuple[int, ...], torch.Tensor]]] = {}
        out: Dict[str, torch.Tensor] = {}
        for name, shape in params:
            loc = self.layout.location(name)
            dtype = self.metadata.state_dict_metadata[loc.key].properties.dtype
            buffer = torch.empty(tuple(shape), dtype=dtype)
            view = buffer.view((1,) * len(loc.index) + tuple(shape))
            offsets = tuple(loc.index) + (0,) * len(shape)
            requests.setdefault(loc.key, []).append((offsets, view))
            out[name] = buffer
        planner = _SliceLoadPlanner(requests)
        planner.set_up_planner({}, self.metadata, True)
        plan = self.reader.prepare_local_plan(planner.create_local_plan())
        plan = planner.finish_plan(self.reader.prepare_global_plan([plan])[0])
        self.reader.read_data(plan, planner).wait()
        return out

    def read_group(self, group: Group) -> Dict[str, torch.Tensor]:
        return self.read(group.params)

    def nbytes(self) -> int:
        """Bytes of the model weights (all groups) as stored."""
        total = 0
        for group in self.groups:
            for name, shape in group.params:
                numel = 1
                for size in shape:
                    numel *= size
                total += numel * torch.empty((), dtype=self.dtype_of(name)).element_size()
        return total


def load_megatron_state(ckpt_dir, model_config: ConfigSource = None,
                        verify_checksums: bool = True) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """(ModelConfig, the full TP1/PP1 state dict) of a dist checkpoint saved under any layout
    (`ckpt_dir` may also be an already checked `MegatronCheckpoint`)."""
    ckpt = ckpt_dir if isinstance(ckpt_dir, MegatronCheckpoint) else MegatronCheckpoint(
        ckpt_dir, model_config, verify_checksums=verify_checksums)
    state: Dict[str, torch.Tensor] = {}
    for group in ckpt.groups:
        state.update(ckpt.read_group(group))
    return ckpt.config, state


def local_model_config(config: ModelConfig) -> ModelConfig:
    """`config` with the local (PyTorch) module flavour, which runs single-process anywhere
    (without the MoE fusions and dispatcher libraries a GPU run may have used)."""
    from dataclasses import replace

    from spannorm_megatron.model.moe_kernels import portable

    return replace(portable(config), transformer_impl="local")


def build_single_process_model(config: ModelConfig, dtype: torch.dtype = torch.float32):
    """A TP1/PP1 GPTModel of `config` in eval mode (megatron-core must be initialized with a
    world of one: `spannorm_megatron.process.initialize()`)."""
    from spannorm_megatron.model import build_gpt_model, transformer_config

    config = local_model_config(config)
    model = build_gpt_model(config, transformer_config(config, **dtype_overrides(dtype)))
    return model.eval()


def dtype_overrides(dtype: torch.dtype) -> dict:
    """The `transformer_config` fields that build a model with `dtype` weights."""
    overrides = {"params_dtype": dtype}
    if dtype == torch.bfloat16:
        overrides["bf16"] = True
    elif dtype == torch.float16:
        overrides["fp16"] = True
    return overrides


def load_megatron_model(ckpt_dir, model_config: ConfigSource = None,
                        dtype: torch.dtype = torch.float32, verify_checksums: bool = True):
    """(ModelConfig, a single-process megatron GPTModel holding the checkpoint's weights)."""
    config, state = load_megatron_state(ckpt_dir, model_config, verify_checksums)
    model = build_single_process_model(config, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    if missing or unexpected:  # pragma: no cover - the layout is tested against the model
        raise ConversionError(f"internal: state dict mismatch, missing {missing}, "
                              f"unexpected {unexpected}")
    return config, model

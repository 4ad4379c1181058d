"""megatron dist checkpoint -> Hugging Face folder (the engine of tools/convert_to_hf.py).

Which class holds the model (``--format auto``, the default):

* prenorm, RMSNorm, SwiGLU, RoPE, a final norm (and for MoE: no biases) -> a native class,
  loadable without remote code: dense `LlamaForCausalLM`; MoE `MixtralForCausalLM`,
  `Qwen2MoeForCausalLM` when a shared expert is configured, `Qwen3MoeForCausalLM` with q/k
  norms, `Glm4MoeForCausalLM` with DeepSeek-V3-style routing (see rules.native_problems);
* everything else (postnorm, spannorm, LayerNorm, GeLU, learned or no position embeddings,
  forward-mode Scale Init, q/k norms, mixed dense/MoE layers or routing no native class holds,
  the gated shared expert, ...) -> our own `SpanNormForCausalLM`, whose two standalone files
  are written into the folder (`trust_remote_code=True`).

``--format native`` refuses (naming why) what no native class can express; ``--format spannorm``
always uses our class.

The export streams: the checkpoint is read one tensor group at a time (embedding, each layer,
final norm + output layer), converted, cast and appended to the safetensors shards, whose
headers are written up front from the planned shapes. Peak memory is about one layer's weights
(in float32 while converting) plus the fixed overhead of torch and the checkpoint metadata, not
the model (see tools/benchmark_conversion.py).

Everything is written into a staging folder beside the destination and renamed to it only once
complete; a failure removes the staging folder, so nothing that looks like a finished export is
ever left behind. What `--save` may be, and what `--overwrite` may replace: hf/destination.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch

from spannorm_megatron.checkpoint.save import storage_problem
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.cli import DTYPE_NAMES, EXPORT_FORMATS
from spannorm_megatron.hf.destination import (
    EXPORT_MARKER,
    check_destination,
    side_path,
    write_marker,
)
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.families import FAMILIES, Family
from spannorm_megatron.hf.megatron_reader import ConfigSource, MegatronCheckpoint
from spannorm_megatron.hf.rules import (
    attention_problems,
    native_family,
    native_problems,
    own_class_problems,
    router_problems,
)
from spannorm_megatron.hf.safetensors_io import ShardedSafetensorsWriter, parse_size
from spannorm_megatron.hf.tensors import count_non_finite

if TYPE_CHECKING:  # the tokenizer modules load only when an export ships a tokenizer
    from spannorm_megatron.data.tokenizer_args import TokenizerConfig
    from spannorm_megatron.hf.tokenizer_export import ExportTokenizer

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
FORMATS = EXPORT_FORMATS


@dataclass
class ExportResult:
    directory: str
    family: str
    architecture: str
    num_parameters: int
    weight_bytes: int
    files: List[str]
    seconds: float
    notes: List[str] = field(default_factory=list)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"--dtype {name!r} is not one of {list(DTYPES)}.") from None


def choose_family(config: ModelConfig, fmt: str) -> tuple:
    """(Family, notes) for `config` under --format `fmt`."""
    if fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r} is not one of {list(FORMATS)}.")
    problems = attention_problems(config) + router_problems(config)
    if problems:
        raise ConversionError("This model cannot be exported: " + "; ".join(problems) + ".")
    notes = []
    if config.is_moe and config.moe_expert_capacity_factor is not None:
        notes.append("the exported model routes every token (no capacity limit): it matches "
                     "the megatron model wherever megatron dropped no token (megatron drops by "
                     "comparing the tokens of a whole batch, in eval too, which no per-token "
                     "forward can reproduce)")
    if config.is_moe and config.moe_input_jitter_eps is not None:
        notes.append("the exported model routes without megatron's input jitter "
                     "(moe_input_jitter_eps multiplies the router's input by random noise in "
                     "every megatron forward, evaluation included)")
    own = own_class_problems(config)
    if fmt == "spannorm" and not own:
        return FAMILIES["spannorm"], notes
    problems = native_problems(config)
    if not problems and fmt != "spannorm":
        return FAMILIES[native_family(config)], notes
    if own:
        raise ConversionError("This model cannot be exported: " + "; ".join(own + problems)
                              + ".")
    if fmt == "native":
        raise ConversionError(
            "No native transformers class can hold this model: " + "; ".join(problems)
            + ". Export it as our own class instead (--format spannorm or auto; it loads with "
            "trust_remote_code=True).")
    notes.append("our own SpanNormForCausalLM (trust_remote_code=True), because: "
                 + "; ".join(problems))
    return FAMILIES["spannorm"], notes


def _pad_multiple(record: Optional[dict]) -> Optional[int]:
    args = (record or {}).get("args") or {}
    layout = (record or {}).get("layout") or {}
    divisible = args.get("make_vocab_size_divisible_by") if isinstance(args, dict) else None
    if not isinstance(divisible, int) or divisible <= 0:
        return None
    tp = layout.get("tensor_model_parallel_size") or args.get("tensor_model_parallel_size") or 1
    return divisible * int(tp)


def _make_parent(save: str) -> None:
    parent = os.path.dirname(save)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"Cannot create {parent}: {err}") from None


def _publish(tmp: str, save: str) -> None:
    """Move the finished `tmp` to `save`, replacing an existing `save` only after the move."""
    old = None
    if os.path.exists(save):
        old = side_path(save, ".old-")
        os.rename(save, old)
    os.rename(tmp, save)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def plan_hf_tensors(family: Family, config: ModelConfig, groups, dtype: torch.dtype):
    """[(group, [(hf name, shape, dtype)])]: the export's tensors, from converting meta tensors."""
    plan = []
    for group in groups:
        meta = {name: torch.empty(shape, device="meta") for name, shape in group.params}
        converted = family.to_hf(config, group, meta)
        plan.append((group, [(name, tuple(t.shape), family.stored_dtype(name, dtype))
                             for name, t in converted.items()]))
    return plan


@dataclass
class ShippedTokenizer:
    """The tokenizer an export ships: the flags it was built from, and its prepared HF files."""

    flags: TokenizerConfig
    files: ExportTokenizer


def export_checkpoint(
    load: str,
    save: str,
    *,
    dtype: str = "float32",
    tokenizer_model: Optional[str] = None,
    max_shard_size: str = "2GB",
    tokenizer_type: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
    model_config: ConfigSource = None,
    fmt: str = "auto",
    verify_checksums: bool = True,
    overwrite: bool = False,
    allow_non_finite: bool = False,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Convert the megatron checkpoint at `load` into a Hugging Face folder at `save`: check
    everything, then write the folder beside `save` and move it there once complete."""
    start = time.perf_counter()
    target_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    save = check_destination(save, overwrite, "replace it", source=load, marker=EXPORT_MARKER)
    log(f"[convert_to_hf] checking checkpoint {load}")
    ckpt = MegatronCheckpoint(load, model_config, verify_checksums=verify_checksums)
    family, notes = choose_family(ckpt.config, fmt)
    for note in notes:
        log(f"[convert_to_hf] note: {note}")
    _log_model(ckpt, family, dtype, log)
    tokenizer = _ship_tokenizer(ckpt, log, tokenizer_type=tokenizer_type,
                                tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                                merge_file=merge_file, vocab_size=vocab_size)
    plan = plan_hf_tensors(family, ckpt.config, ckpt.groups, target_dtype)
    with _staging_folder(save) as tmp:
        _write_configs(tmp, family, ckpt.config, target_dtype, tokenizer)
        weights = _write_weights(tmp, ckpt, family, plan, target_dtype, shard_bytes,
                                 allow_non_finite, log)
        write_marker(tmp, EXPORT_MARKER, _export_info(ckpt, family, dtype, tokenizer))
        files = sorted(os.listdir(tmp))
    num_parameters = sum(_numel(shape) for _group, entries in plan for _n, shape, _d in entries)
    seconds = time.perf_counter() - start
    log(f"[convert_to_hf] wrote {save} ({num_parameters:,} parameters, {len(weights.files)} "
        f"weight file(s)) in {seconds:.1f}s")
    return ExportResult(save, family.name, family.architecture, num_parameters,
                        weights.total_size, files, seconds, notes)


def _log_model(ckpt: MegatronCheckpoint, family: Family, dtype: str, log) -> None:
    config = ckpt.config
    log(f"[convert_to_hf] {ckpt.directory}: {config.norm_placement}, {config.num_layers} layers, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}"
        + (f", {config.num_experts} experts" if config.is_moe else "")
        + f" -> {family.architecture} ({dtype})")


def _ship_tokenizer(ckpt: MegatronCheckpoint, log, **given) -> Optional[ShippedTokenizer]:
    """The tokenizer flags given, completed from the run record (a moved file keeps its type),
    prepared for the HF folder; None (said in the log) when neither names one."""
    from spannorm_megatron.data.tokenizer_args import check_recorded_tokenizer, recorded_tokenizer
    from spannorm_megatron.hf.tokenizer_export import prepare_export_tokenizer

    args = (ckpt.run_record or {}).get("args")
    flags, why = recorded_tokenizer(args, **given)
    check_recorded_tokenizer(args, flags, "an export")
    if flags is None:
        log(f"[convert_to_hf] no tokenizer ({why}): writing the model only; pass the tokenizer "
            f"flags (--tokenizer-type with --tokenizer-model, --vocab-file and --merge-file, or "
            f"--vocab-size) to ship one")
        return None
    files = prepare_export_tokenizer(flags, ckpt.config.vocab_size, _pad_multiple(ckpt.run_record))
    log(f"[convert_to_hf] tokenizer: {flags.describe()}")
    for note in files.notes:
        log(f"[convert_to_hf] note: {note}")
    if files.mismatches:
        log(f"[convert_to_hf] WARNING: the Hugging Face tokenizer encodes "
            f"{len(files.mismatches)} sample text(s) differently from training, e.g. "
            f"{files.mismatches[0]!r}")
    return ShippedTokenizer(flags, files)


@contextmanager
def _staging_folder(save: str):
    """A fresh staging folder beside `save` (hf/destination.py), moved to `save` when the block
    completes and removed when it fails, so nothing that looks like a finished export is left
    behind. A write the storage refuses (no space, a file-size limit, permissions) is reported
    as such, not as a traceback."""
    _make_parent(save)
    tmp = side_path(save, ".tmp-")
    try:
        os.makedirs(tmp)
        yield tmp
        _publish(tmp, save)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = storage_problem(error) if isinstance(error, OSError) else None
        if problem:
            raise ConversionError(
                f"--save {save}: the export could not be written ({problem}: {error}). Nothing "
                f"was left at --save. Free space, lift the limit (ulimit -f), choose another "
                f"--save, or write smaller files (--max-shard-size).") from None
        raise


def _write_configs(tmp: str, family: Family, config: ModelConfig, dtype: torch.dtype,
                   tokenizer: Optional[ShippedTokenizer]) -> None:
    """config.json, generation_config.json, our class's code when it is not a native one, and
    the tokenizer's files."""
    import transformers

    special = dict(tokenizer.files.special_ids) if tokenizer is not None else {}
    config_json = family.config_json(config, dtype, special)
    config_json["transformers_version"] = transformers.__version__
    _write_json(os.path.join(tmp, "config.json"), config_json)
    generation = {"transformers_version": transformers.__version__}
    if tokenizer is not None:
        ids, stop = tokenizer.files.special_ids, tokenizer.files.stop_ids
        generation.update({key: value for key, value in (
            ("bos_token_id", ids.get("bos")), ("pad_token_id", ids.get("pad")),
            ("eos_token_id", stop if len(stop) > 1 else stop[0])) if value is not None})
    _write_json(os.path.join(tmp, "generation_config.json"), generation)
    if not family.native:
        from spannorm_megatron.hf.remote_code import REMOTE_CODE_FILES

        source = os.path.join(os.path.dirname(__file__), "remote_code")
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
    if tokenizer is not None:
        tokenizer.files.write(tmp, config.max_sequence_length)


def _write_weights(tmp: str, ckpt: MegatronCheckpoint, family: Family, plan,
                   dtype: torch.dtype, shard_bytes: int, allow_non_finite: bool,
                   log) -> ShardedSafetensorsWriter:
    """Stream the checkpoint one tensor group at a time into the safetensors shards."""
    flat = [entry for _group, entries in plan for entry in entries]
    writer = ShardedSafetensorsWriter(tmp, flat, shard_bytes,
                                      metadata={"source": "spannorm_megatron"})
    try:
        done_bytes, total = 0, writer.total_size
        for group, entries in plan:
            t0 = time.perf_counter()
            tensors = {k: v.float() for k, v in ckpt.read_group(group).items()}
            if not allow_non_finite:
                _check_finite(tensors, ckpt.directory)
            converted = family.to_hf(ckpt.config, group, tensors)
            del tensors
            converted = {k: v.to(family.stored_dtype(k, dtype)) for k, v in converted.items()}
            writer.write(converted)
            done_bytes += sum(v.numel() * v.element_size() for v in converted.values())
            del converted
            log(f"[convert_to_hf] {group.name:>10}: {len(entries)} tensors, "
                f"{done_bytes / 2**20:,.1f} / {total / 2**20:,.1f} MiB "
                f"({done_bytes / max(total, 1):.0%}, {time.perf_counter() - t0:.2f}s)")
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer


def _export_info(ckpt: MegatronCheckpoint, family: Family, dtype: str,
                 tokenizer: Optional[ShippedTokenizer]) -> dict:
    """The marker's content: where the folder came from, and what it was made of."""
    flags = tokenizer.flags if tokenizer is not None else None
    return {
        "source_checkpoint": ckpt.directory,
        "iteration": (ckpt.run_record or {}).get("iteration"),
        "family": family.name,
        "architecture": family.architecture,
        "dtype": dtype,
        "tokenizer_model": flags and flags.tokenizer_model,
        "tokenizer": flags and {k: v for k, v in vars(flags).items() if v is not None},
        "model_config": ckpt.config.to_dict(),
        "versions": _versions(),
    }


def _check_finite(tensors: dict, directory: str) -> None:
    """A NaN or Inf weight makes every output NaN: refuse it before it reaches a user's
    `from_pretrained`, naming the tensor (the run diverged before this checkpoint)."""
    for name, tensor in tensors.items():
        bad = count_non_finite(tensor)
        if bad:
            raise ConversionError(
                f"{directory}: {name} holds {bad} non-finite value(s) (NaN/Inf) of "
                f"{tensor.numel()}: the run diverged before this checkpoint was saved. Export an "
                f"earlier checkpoint (--load <dir>/iter_XXXXXXX) instead, or pass "
                f"--allow-non-finite to export it as it is.")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _versions() -> Dict[str, str]:
    import safetensors
    import transformers

    import spannorm_megatron

    return {"torch": str(torch.__version__), "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "spannorm_megatron": getattr(spannorm_megatron, "__version__", "unknown")}

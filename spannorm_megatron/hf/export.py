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

Everything is written into ``SAVE.tmp-<id>`` beside the destination and renamed to it only once
complete; a failure removes the temporary directory, so nothing that looks like a finished
export is ever left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError, check_destination
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("auto", "native", "spannorm")
EXPORT_INFO_FILE = "spannorm_export.json"


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


def _tokenizer_from_record(record: Optional[dict]) -> Optional[str]:
    """The run's recorded SentencePiece model file, where it exists (older callers)."""
    args = (record or {}).get("args") or {}
    path = args.get("tokenizer_model") if isinstance(args, dict) else None
    return path if isinstance(path, str) and os.path.isfile(path) else None


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
        old = f"{save}.old-{uuid.uuid4().hex[:8]}"
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
    """Convert the megatron checkpoint at `load` into a Hugging Face folder at `save`."""
    start = time.perf_counter()
    target_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    save = check_destination(save, overwrite, "replace it", source=load)
    log(f"[convert_to_hf] checking checkpoint {load}")
    ckpt = MegatronCheckpoint(load, model_config, verify_checksums=verify_checksums)
    config = ckpt.config
    family, notes = choose_family(config, fmt)
    for note in notes:
        log(f"[convert_to_hf] note: {note}")
    log(f"[convert_to_hf] {ckpt.directory}: {config.norm_placement}, {config.num_layers} layers, "
        f"hidden {config.hidden_size}, vocab {config.vocab_size}"
        + (f", {config.num_experts} experts" if config.is_moe else "")
        + f" -> {family.architecture} ({dtype})")

    # The tokenizer flags given, completed from the run record (a moved file keeps its type).
    from spannorm_megatron.data.tokenizer_args import recorded_tokenizer

    tokenizer_flags, why = recorded_tokenizer(
        (ckpt.run_record or {}).get("args"), tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model, vocab_file=vocab_file, merge_file=merge_file,
        vocab_size=vocab_size)
    tokenizer = None
    if tokenizer_flags is not None:
        from spannorm_megatron.hf.tokenizer_export import prepare_export_tokenizer

        tokenizer = prepare_export_tokenizer(tokenizer_flags, config.vocab_size,
                                             _pad_multiple(ckpt.run_record))
        log(f"[convert_to_hf] tokenizer: {tokenizer_flags.describe()}")
        for note in tokenizer.notes:
            log(f"[convert_to_hf] note: {note}")
        if tokenizer.mismatches:
            log(f"[convert_to_hf] WARNING: the Hugging Face tokenizer encodes "
                f"{len(tokenizer.mismatches)} sample text(s) differently from training, e.g. "
                f"{tokenizer.mismatches[0]!r}")
    else:
        log(f"[convert_to_hf] no tokenizer ({why}): writing the model only; pass the tokenizer "
            f"flags (--tokenizer-type with --tokenizer-model, --vocab-file and --merge-file, or "
            f"--vocab-size) to ship one")

    plan = plan_hf_tensors(family, config, ckpt.groups, target_dtype)
    flat = [entry for _group, entries in plan for entry in entries]
    special = {}
    if tokenizer is not None:
        special = dict(tokenizer.special_ids)

    _make_parent(save)
    tmp = f"{save}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    writer = None
    try:
        config_json = family.config_json(config, target_dtype, special)
        import transformers

        config_json["transformers_version"] = transformers.__version__
        _write_json(os.path.join(tmp, "config.json"), config_json)
        generation = {"transformers_version": transformers.__version__}
        if tokenizer is not None:
            ids, stop = tokenizer.special_ids, tokenizer.stop_ids
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
            tokenizer.write(tmp, config.max_sequence_length)

        writer = ShardedSafetensorsWriter(tmp, flat, shard_bytes,
                                          metadata={"source": "spannorm_megatron"})
        done_bytes, total = 0, writer.total_size
        for group, entries in plan:
            t0 = time.perf_counter()
            tensors = {k: v.float() for k, v in ckpt.read_group(group).items()}
            if not allow_non_finite:
                _check_finite(tensors, ckpt.directory)
            converted = family.to_hf(config, group, tensors)
            del tensors
            converted = {k: v.to(family.stored_dtype(k, target_dtype))
                         for k, v in converted.items()}
            writer.write(converted)
            done_bytes += sum(v.numel() * v.element_size() for v in converted.values())
            del converted
            log(f"[convert_to_hf] {group.name:>10}: {len(entries)} tensors, "
                f"{done_bytes / 2**20:,.1f} / {total / 2**20:,.1f} MiB "
                f"({done_bytes / max(total, 1):.0%}, {time.perf_counter() - t0:.2f}s)")
        writer.close()
        record = ckpt.run_record or {}
        _write_json(os.path.join(tmp, EXPORT_INFO_FILE), {
            "source_checkpoint": ckpt.directory,
            "iteration": record.get("iteration"),
            "family": family.name,
            "architecture": family.architecture,
            "dtype": dtype,
            "tokenizer_model": tokenizer_flags and tokenizer_flags.tokenizer_model,
            "tokenizer": tokenizer_flags and {
                k: v for k, v in vars(tokenizer_flags).items() if v is not None},
            "model_config": config.to_dict(),
            "versions": _versions(),
        })
        files = sorted(os.listdir(tmp))
        _publish(tmp, save)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    num_parameters = sum(_numel(shape) for _name, shape, _dtype in flat)
    seconds = time.perf_counter() - start
    log(f"[convert_to_hf] wrote {save} ({num_parameters:,} parameters, {len(writer.files)} "
        f"weight file(s)) in {seconds:.1f}s")
    return ExportResult(save, family.name, family.architecture, num_parameters, writer.total_size,
                        files, seconds, notes)


def _check_finite(tensors: dict, directory: str) -> None:
    """A NaN or Inf weight makes every output NaN: refuse it before it reaches a user's
    `from_pretrained`, naming the tensor (the run diverged before this checkpoint)."""
    for name, tensor in tensors.items():
        bad = int((~torch.isfinite(tensor)).sum())
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

"""An HF folder's config.json against the records of the model beside it.

transformers reads config.json, so config.json is what an HF folder's model computes. Our
folders also carry the megatron `ModelConfig` they were exported from: inside config.json
(`megatron_model_config`, our own class) and in the export's marker (`spannorm_export.json`).
An import that built the model from such a record while config.json said otherwise would give a
model other than the one transformers evaluates. So every field the export writes into
config.json is recomputed from each record and compared; a difference is refused, naming the
fields, before anything is converted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from typing import List, Optional

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.destination import EXPORT_MARKER
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.family import Family

# Keys that say how a folder was written, not what its model computes.
_NOT_THE_MODEL = frozenset({
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "megatron_model_config"})


def _record_config(values) -> Optional[ModelConfig]:
    if not isinstance(values, dict):
        return None
    known = {f.name for f in fields(ModelConfig)}
    try:
        return ModelConfig.from_dict({k: v for k, v in values.items() if k in known})
    except ValueError:
        return None  # a record this version cannot read says nothing here


def _records(hf_config: dict, directory: str) -> List[tuple]:
    """(name, ModelConfig) of each record of the model found beside config.json."""
    found = [("its megatron_model_config", _record_config(hf_config.get("megatron_model_config")))]
    try:
        with open(os.path.join(directory, EXPORT_MARKER)) as f:
            found.append((EXPORT_MARKER, _record_config(json.load(f).get("model_config"))))
    except (OSError, ValueError, AttributeError):
        pass
    return [(name, config) for name, config in found if config is not None]


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_same(a[key], b[key]) for key in a.keys() & b.keys())
    return a == b


def differences(family: Family, record: ModelConfig, hf_config: dict) -> List[str]:
    """`key: config.json X, record Y` for every model field the two disagree on."""
    expected = family.config_json(record, torch.float32)
    return [f"{key}: config.json {hf_config[key]!r}, record {expected[key]!r}"
            for key in sorted(expected.keys() & hf_config.keys() - _NOT_THE_MODEL)
            if not _same(hf_config[key], expected[key])]


def check_records_agree(family: Family, hf_config: dict, directory: str) -> None:
    """Refuse a config.json that contradicts a record of the model it was exported with."""
    for name, record in _records(hf_config, directory):
        found = differences(family, record, hf_config)
        if found:
            raise ConversionError(
                f"{directory}: config.json contradicts {name} (" + "; ".join(found[:6])
                + (" ..." if len(found) > 6 else "") + "). transformers computes what "
                "config.json says, the record says how the model was trained: restore "
                "config.json, or make the change in both (config.json's megatron_model_config "
                f"and {EXPORT_MARKER}'s model_config) if it is meant.")

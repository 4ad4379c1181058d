"""Hugging Face conversion: megatron checkpoints <-> transformers folders, and generation.

Public API (imported lazily, so `spannorm_megatron.hf.remote_code` stays light):

* `export_checkpoint(load, save, *, dtype, tokenizer_model, max_shard_size, model_config, fmt,
  ...)` -> `ExportResult`: megatron dist checkpoint -> HF folder (tools/convert_to_hf.py).
* `convert_hf_to_megatron(load, save, *, tensor_model_parallel_size, ...)`: HF folder ->
  megatron checkpoint, on every rank of the target layout (tools/convert_from_hf.py).
* `load_megatron_state(ckpt_dir, model_config=None)` -> (ModelConfig, TP1/PP1 state dict) of a
  checkpoint saved under any layout; `MegatronCheckpoint` reads it group by group;
  `load_megatron_model` builds the single-process megatron model holding it.
* `HFCheckpoint(hf_dir)`: an HF folder checked against the megatron model it converts to
  (`.config`, `.family`, `.megatron_state()`).
* `export_rule` / `ExportRule` (rules.py): a placement's norms as exported, from the registry;
  `FAMILIES` (families.py): Llama, Mixtral, Qwen2/3-MoE, GLM-4-MoE (native_families.py) and
  our class (spannorm_family.py) as state-dict adapters (family.py: one weight mapping, both
  directions; config.json written and read back).
* `ConversionError`: every bad-input error (a `ValueError`).
* `generation`: the sampling loop behind tools/generate.py.

Modules: `rules` (placements), `layout` (megatron names/shapes and dist-checkpoint keys),
`tensors` (QKV and SwiGLU layouts), `families` (HF names, config.json), `megatron_reader`,
`safetensors_io`, `tokenizer`, `export`, `importer`, `generation`, `remote_code/` (the
standalone model files written into exported folders).
"""

_EXPORTS = {
    "export_checkpoint": "spannorm_megatron.hf.export",
    "ExportResult": "spannorm_megatron.hf.export",
    "convert_hf_to_megatron": "spannorm_megatron.hf.importer",
    "HFCheckpoint": "spannorm_megatron.hf.importer",
    "load_megatron_state": "spannorm_megatron.hf.megatron_reader",
    "load_megatron_model": "spannorm_megatron.hf.megatron_reader",
    "MegatronCheckpoint": "spannorm_megatron.hf.megatron_reader",
    "export_rule": "spannorm_megatron.hf.rules",
    "ExportRule": "spannorm_megatron.hf.rules",
    "FAMILIES": "spannorm_megatron.hf.families",
    "ConversionError": "spannorm_megatron.hf.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spannorm_megatron.hf' has no attribute {name!r}")

"""The command-line tools as tests call them: each tools/NAME.py is a thin entry point to a
package module's `main` (its console script), and tests call that `main` in this process."""

import importlib

TOOL_MODULES = {
    "train_tokenizer": "spannorm_megatron.data.tokenizer_training_cli",
    "preprocess_data": "spannorm_megatron.data.preprocess_cli",
    "convert_to_hf": "spannorm_megatron.hf.export_cli",
    "convert_from_hf": "spannorm_megatron.hf.importer_cli",
    "evaluate": "spannorm_megatron.evaluation.cli",
    "generate": "spannorm_megatron.hf.generation_cli",
    "benchmark": "spannorm_megatron.benchmarks.training",
    "benchmark_moe": "spannorm_megatron.benchmarks.moe",
    "benchmark_conversion": "spannorm_megatron.benchmarks.conversion",
    "benchmark_data": "spannorm_megatron.benchmarks.data",
    "signal_propagation": "spannorm_megatron.lab.cli",
}
"""tools/NAME.py -> the package module whose `main` it runs."""


def tool_module(name: str):
    """The package module behind tools/NAME.py."""
    return importlib.import_module(TOOL_MODULES[name])


def tool_main(name: str):
    """The `main(argv)` behind tools/NAME.py: exit status 0, or 2 with one `error:` line."""
    return tool_module(name).main

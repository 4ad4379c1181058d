"""spannorm_megatron: a Megatron-Core training stack for SpanNorm and other norm placements.

Importing the package changes nothing in torch or megatron-core, save one thing on a machine
without a GPU: megatron-core's `jit_fuser` will compile nothing there (`machine.py` says why; it
must be decided before megatron-core is imported). The CPU runtime and upstream patches are
applied only by `spannorm_megatron.process`, which entry points call. Importing it does quiet
two kinds of upstream warnings that tell a user nothing, printed by every rank and every process it spawns
(checkpoint writers): megatron-core's import-time notes, from five modules, that Transformer
Engine or Apex is not installed (the run's first lines say once which fused kernels it has,
`training.trainer`), and torch's deprecations of calls megatron-core makes (two collective
names; the ShardedTensor and `load_state_dict` of dist checkpointing, on every resume).
"""

import warnings as _warnings

from spannorm_megatron.machine import eager_jit_fuser_without_gpu as _eager_jit_fuser_without_gpu

_eager_jit_fuser_without_gpu()

# The project's only warning filters: every command imports the package before megatron-core.
for _absent in (r"Transformer Engine and Apex are not installed", r"Apex is not installed"):
    _warnings.filterwarnings("ignore", message=_absent, category=UserWarning)
# torch 2.13 renames two collectives megatron-core 0.16 calls; nothing for a user to change.
_warnings.filterwarnings(
    "ignore", category=FutureWarning,
    message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
for _deprecated in (r"Please use DTensor instead and we are deprecating ShardedTensor",
                    r"`load_state_dict` is deprecated and will be removed"):
    _warnings.filterwarnings("ignore", category=FutureWarning, message=_deprecated)

__version__ = "0.1.0"

"""spannorm_megatron: a Megatron-Core training stack for SpanNorm and other norm placements.

Importing the package changes nothing in torch or megatron-core; the CPU runtime and upstream
patches are applied by `spannorm_megatron.runtime.initialize()` only.
"""

__version__ = "0.1.0"

"""The error type of the Hugging Face conversion tools.

A `UserError` (so a `ValueError`): a checkpoint, HF folder, tokenizer or flag that cannot be
converted is bad input, not a bug. The command-line tools print its message without a traceback
and exit with status 2. Every check that raises one runs before anything is written, and a
conversion writes into a temporary directory that is renamed into place only when complete, so
an error never leaves something that looks like a finished export or checkpoint.
"""

from spannorm_megatron.errors import UserError


class ConversionError(UserError):
    """Input the Hugging Face conversion cannot use; the message names it and the fix."""

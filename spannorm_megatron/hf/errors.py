"""The error type of the Hugging Face conversion tools.

A `UserError` (so a `ValueError`): a checkpoint, HF folder, tokenizer or flag that cannot be
converted is bad input, not a bug. The command-line tools print its message without a traceback
and exit with status 2. Every check that raises one runs before anything is written, and a
conversion writes into a temporary directory that is renamed into place only when complete, so
an error never leaves something that looks like a finished export or checkpoint.
"""

import os
from typing import Collection, Dict, List, Tuple

from spannorm_megatron.errors import UserError


class ConversionError(UserError):
    """Input the Hugging Face conversion cannot use; the message names it and the fix."""


def _first(names: List[str], limit: int = 8) -> str:
    return f"{names[:limit]}" + (" ..." if len(names) > limit else "")


def tensor_mismatches(expected: Dict[str, Tuple[int, ...]], found: Dict[str, Tuple[int, ...]],
                      *, unexpected_are: str, optional: Collection[str] = ()) -> List[str]:
    """What differs between the tensors a model needs and those a file holds, as message parts
    ("lacks [...]", "has <unexpected_are>: [...]", "has other shapes: [...]"); [] when equal."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{name} {found[name]} (expected {expected[name]})"
                   for name in set(found) & set(expected) if found[name] != expected[name])
    parts = []
    if missing:
        parts.append(f"lacks {_first(missing)}")
    if unexpected:
        parts.append(f"has {unexpected_are}: {_first(unexpected)}")
    if wrong:
        parts.append(f"has other shapes: {_first(wrong)}")
    return parts


def check_destination(save: str, overwrite: bool, action: str, source: str) -> str:
    """The absolute `--save` path, refused if it is a file, if it is or holds `source` (the
    `--load` input), if it is a training checkpoint directory, or if it is a non-empty directory
    without `overwrite`; `action` says what --overwrite would do ("replace it", ...). Nothing a
    user has is destroyed by a conversion: --overwrite only ever replaces an earlier output."""
    from spannorm_megatron.checkpoint import TRACKER_FILENAME

    save, source = os.path.abspath(save), os.path.abspath(source)
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConversionError(f"--save {save} exists and is not a directory.")
    if save == source or source.startswith(save + os.sep):
        raise ConversionError(f"--save {save} holds the --load input {source}: writing there "
                              f"would destroy it. Choose another --save directory.")
    if not os.path.isdir(save) or not os.listdir(save):
        return save
    if os.path.exists(os.path.join(save, TRACKER_FILENAME)):
        raise ConversionError(f"--save {save} is a training checkpoint directory (it has "
                              f"{TRACKER_FILENAME}); a conversion never writes into one, "
                              f"--overwrite or not. Choose another --save directory.")
    if not overwrite:
        raise ConversionError(f"--save {save} exists and is not empty; pass --overwrite to "
                              f"{action}, or choose another directory.")
    return save

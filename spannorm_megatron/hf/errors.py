"""The error type of the Hugging Face conversion tools.

A `UserError` (so a `ValueError`): a checkpoint, HF folder, tokenizer or flag that cannot be
converted is bad input, not a bug. The command-line tools print its message without a traceback
and exit with status 2. Every check that raises one runs before anything is written, and a
conversion writes into a temporary directory that is renamed into place only when complete, so
an error never leaves something that looks like a finished export or checkpoint.
"""

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

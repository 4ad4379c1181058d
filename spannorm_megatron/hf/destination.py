"""Where a conversion writes: refused unless nothing of the user's can be lost.

A conversion writes its output (an HF folder, or a megatron checkpoint directory) into
``SAVE.tmp-<host>-<pid>-<nonce>`` beside `--save`, and moves it into place only when complete.
`--overwrite` replaces an earlier output of the same converter, and nothing else: that output is
recognised by the marker file the converter writes into it (`spannorm_export.json`, or
`spannorm_import.json` for a converted checkpoint), which lists every entry the converter wrote.
A `--save` that holds anything else (a training checkpoint at any depth, notes, another folder)
is refused, naming what it holds, as is a `--save` inside a training checkpoint directory or
one that is, holds, or lies inside the `--load` input.

A killed conversion leaves its staging folder behind; the next conversion to the same `--save`
on the same host removes those whose process is gone (and puts back a replaced output whose
replacement never arrived).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from typing import Iterable, List, Optional

from spannorm_megatron.checkpoint import TRACKER_FILENAME
from spannorm_megatron.checkpoint.naming import parse_side_dirname
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.orphans import process_gone

EXPORT_MARKER = "spannorm_export.json"
IMPORT_MARKER = "spannorm_import.json"
# What exports made before the marker listed its files wrote: read only to recognise them.
_EARLIER_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                         "model.safetensors.index.json", "special_tokens_map.json",
                         "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                         "configuration_spannorm.py", "modeling_spannorm.py", "vocab.json",
                         "merges.txt", EXPORT_MARKER)
_STAGING, _REPLACED = ".tmp-", ".old-"


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def side_path(save: str, kind: str) -> str:
    """A staging (`.tmp-`) or replaced (`.old-`) sibling of `save`, named for this process."""
    return f"{save}{kind}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_gone(name: str, prefix: str) -> bool:
    """Whether the sibling `name` (prefix + host-pid-nonce) was made by a process of this host
    that no longer runs. Another host's, or an unparsable name, is left alone."""
    parts = name[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    return process_gone(int(parts[1]))


def remove_debris(save: str) -> List[str]:
    """Remove what killed conversions to `save` left beside it; the paths removed."""
    parent, base = os.path.split(save)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in sorted(os.listdir(parent)):
        for kind in (_STAGING, _REPLACED):
            if name.startswith(base + kind) and _process_gone(name, base + kind):
                path = os.path.join(parent, name)
                if kind == _REPLACED and not os.path.exists(save):
                    try:  # its replacement never arrived: the old one is back
                        os.rename(path, save)
                    except OSError:
                        pass  # another rank of the same conversion put it back first
                else:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def write_marker(directory: str, marker: str, info: dict,
                 entries: Iterable[str] = ()) -> None:
    """The converter's marker, listing every entry of `directory` and `entries` (what it is
    about to write there), the marker included."""
    listed = sorted(set(os.listdir(directory)) | set(entries) | {marker})
    with open(os.path.join(directory, marker), "w") as f:
        json.dump({**info, "written_by_converter": listed}, f, indent=2, sort_keys=True)
        f.write("\n")


def _written_by_converter(save: str, marker: str) -> Optional[List[str]]:
    """The entries `save`'s marker says its converter wrote; None without a readable marker."""
    try:
        with open(os.path.join(save, marker)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    listed = info.get("written_by_converter")
    if listed is None and marker == EXPORT_MARKER:
        return list(_EARLIER_EXPORT_FILES)
    return listed if isinstance(listed, list) else None


def _inside_training_checkpoint(path: str) -> Optional[str]:
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        if os.path.isfile(os.path.join(parent, TRACKER_FILENAME)):
            return parent
        parent = os.path.dirname(parent)
    return None


def _describe(save: str, names: List[str]) -> str:
    shown = [name + ("/" if os.path.isdir(os.path.join(save, name)) else "")
             for name in sorted(names)[:6]]
    return ", ".join(shown) + (" ..." if len(names) > 6 else "")


def check_destination(save: str, overwrite: bool, action: str, source: str,
                      marker: str) -> str:
    """The absolute `--save` path, checked as the module docstring says; `action` says what
    --overwrite would do ("replace it", ...); `marker` is this converter's marker file."""
    save, source = os.path.abspath(save), os.path.abspath(source)
    if os.path.exists(save) and not os.path.isdir(save):
        raise ConversionError(f"--save {save} exists and is not a directory.")
    if save == source or source.startswith(save + os.sep) or save.startswith(source + os.sep):
        raise ConversionError(f"--save {save} is, holds or lies inside the --load input "
                              f"{source}: writing there could destroy it. Choose a --save "
                              f"directory outside it.")
    holder = _inside_training_checkpoint(save)
    if holder:
        raise ConversionError(f"--save {save} lies inside the training checkpoint directory "
                              f"{holder} (it has {TRACKER_FILENAME}): a conversion never writes "
                              f"there. Choose a --save directory outside it.")
    remove_debris(save)
    if not os.path.isdir(save) or not os.listdir(save):
        return save
    present = os.listdir(save)
    written = _written_by_converter(save, marker)
    if written is None:
        what = (f"a training checkpoint directory (it has {TRACKER_FILENAME})"
                if TRACKER_FILENAME in present else f"not empty ({_describe(save, present)})")
        raise ConversionError(
            f"--save {save} is {what} and was not written by this converter (it has no "
            f"{marker}): a conversion never replaces it, --overwrite or not. Choose another "
            f"--save directory.")
    # An interrupted checkpoint save leaves its own side folders; the next save clears them.
    foreign = sorted(name for name in set(present) - set(written)
                     if parse_side_dirname(name) is None)
    if foreign:
        raise ConversionError(
            f"--save {save} holds an earlier conversion and also {_describe(save, foreign)}, "
            f"which the converter did not write: --overwrite would delete them. Move them "
            f"away, or choose another --save directory.")
    if not overwrite:
        raise ConversionError(f"--save {save} holds an earlier conversion; pass --overwrite to "
                              f"{action}, or choose another directory.")
    return save

"""What a path option names, and the one check of each kind, run while the flags are parsed.

Every option that takes a path declares its kind, `option(..., path=KIND)`:

    input_file          a readable, non-empty file
    input_folder        a readable, non-empty folder
    data_prefix         a Megatron indexed dataset: <prefix>.bin and <prefix>.idx that belong
                        together (a list of prefixes may carry blend weights between them)
    checkpoint          a megatron checkpoint to read: a --save directory (its pointer file
                        holding an iteration number), an iter_NNNNNNN directory, or a bare
                        distributed checkpoint
    resume_checkpoint   spannorm-train's --load: a checkpoint as above, or a path that holds
                        none yet (the run starts from scratch, as Megatron-LM's does)
    hf_folder           a Hugging Face model folder: config.json (a JSON object) and whole
                        weight files
    checkpoint_or_hf_folder   either of the two, told apart by config.json
    tokenizer_model     a SentencePiece .model that loads, or a Hugging Face tokenizer folder
    output_file         a file that can be written (its folder exists or can be made)
    output_folder       a folder that is, or can be, written into

`check_path(kind, value)` raises the kind's UserError, naming the path, what is wrong and the
fix; `options.add_arguments` runs it on every value a command line or a --config file gives,
so that a path that cannot work ends the command (exit status 2, the flag named) before
anything heavy is imported or started. The later, deeper reads (loading a checkpoint, building
datasets) keep their own errors; a value these checks pass is of the right kind.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from spannorm_megatron.config.indexed_files import check_indexed_dataset
from spannorm_megatron.config.tokenizer_files import check_sentencepiece_model, hf_tokenizer_files
from spannorm_megatron.errors import ConfigError, UserError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
"""Megatron-LM's pointer to the iteration to resume from (`checkpoint.naming` lays out the rest
of a save directory)."""

DIST_CHECKPOINT_METADATA = ".metadata"
"""torch.distributed.checkpoint's metadata file: a directory holding it is one checkpoint."""

HF_CONFIG = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
"""What transformers reads from a model folder: its config and its weights."""


# ------------------------------------------------------------------------ files and folders
def _relative(path: str) -> str:
    return "" if os.path.isabs(path) else f" (relative paths are taken from {os.getcwd()})"


def check_link(path: str) -> None:
    """A symbolic link that leads nowhere is named as such: not as a missing path (which it is
    not, to `ls`), and not left for a later write to trip over."""
    if not os.path.islink(path) or os.path.exists(path):
        return
    try:
        os.stat(path)
        why = "cannot be followed"
    except OSError as error:
        why = "loops back on itself" if error.errno == errno.ELOOP else \
            f"points to '{os.readlink(path)}', which does not exist"
    raise ConfigError(f"'{path}' is a symbolic link that {why}: fix or remove the link, or pass "
                      f"the real path.")


def _not_a_regular_file(path: str) -> Optional[str]:
    mode = os.stat(path).st_mode
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


def check_input_file(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"'{path}' does not exist{_relative(path)}; check the path.")
    if os.path.isdir(path):
        raise ConfigError(f"'{path}' is a directory, not a file: pass the file itself.")
    special = _not_a_regular_file(path)
    if special:  # a pipe blocks (or never ends, like /dev/zero); the tools read files twice
        raise ConfigError(f"'{path}' is {special}, not a regular file: write the text to a file "
                          f"and pass that.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"'{path}' cannot be read (permissions): fix them (chmod a+r) or copy "
                          f"the file somewhere readable.")
    if os.path.getsize(path) == 0 and os.path.isfile(path):
        raise ConfigError(f"'{path}' is empty.")


def check_input_folder(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"'{path}' does not exist{_relative(path)}; check the path.")
    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' is a file, not a directory: pass the directory that holds "
                          f"it.")
    try:
        entries = os.listdir(path)
    except OSError as error:
        raise ConfigError(f"'{path}' cannot be read ({error.strerror}).") from None
    if not entries:
        raise ConfigError(f"'{path}' is an empty directory.")


def check_output_folder(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"'{path}' is a file, not a directory: pass a directory to write "
                          f"into.")
    _check_writable(path)


def check_output_file(path: str) -> None:
    if os.path.isdir(path):
        raise ConfigError(f"'{path}' is a directory: pass the name of the file to write.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"'{path}' exists and cannot be written (permissions): choose another "
                          f"name or fix them.")
    _check_writable(os.path.dirname(os.path.abspath(path)))


def _check_writable(folder: str) -> None:
    """The nearest existing folder at or above `folder` takes a new file (so `folder` can be
    made in it)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"'{folder}' cannot be created: {existing} is a file.")
    try:  # os.access misjudges read-only mounts and ACLs; a real file does not
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"'{folder}' cannot be written ({error.strerror} in {existing}): "
                          f"choose a writable location.") from None


# ------------------------------------------------------------------------ formats
def check_data_prefix(path: str) -> None:
    for name in (path + ".bin", path + ".idx"):
        check_link(name)
    if os.path.isdir(path) and not os.path.exists(path + ".bin"):
        raise ConfigError(
            f"'{path}' is a directory; a data prefix names the files <prefix>.bin and <prefix>.idx "
            f"(what tools/preprocess_data.py reported, e.g. data/corpus_text_document).")
    check_indexed_dataset(path, what="Data prefix")


def read_tracker(directory: str) -> Optional[int]:
    """The iteration in `directory`'s pointer file, None when it has none; ConfigError when the
    file holds anything but a non-negative integer."""
    path = os.path.join(directory, TRACKER_FILENAME)
    try:
        with open(path) as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as error:
        text = f"<unreadable: {type(error).__name__}>"
    if text.isdigit() and text.isascii():
        return int(text)
    raise ConfigError(
        f"{path} should hold the iteration to resume from but holds {text[:40]!r}. Write the "
        f"iteration of a complete checkpoint into it (e.g. `echo 100 > {path}` for "
        f"iter_0000100), or delete it to load the newest complete iter_* directory.")


def check_checkpoint(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"'{path}' does not exist{_relative(path)}; check the path (a "
                          f"checkpoint is the --save directory of a run).")
    _check_checkpoint_directory(path)
    if not (os.path.exists(os.path.join(path, TRACKER_FILENAME))
            or os.path.isfile(os.path.join(path, DIST_CHECKPOINT_METADATA))
            or any(name.startswith("iter_") and os.path.isdir(os.path.join(path, name))
                   for name in os.listdir(path))):
        raise ConfigError(
            f"'{path}' holds no checkpoint: no {TRACKER_FILENAME}, no iter_NNNNNNN directory and "
            f"no {DIST_CHECKPOINT_METADATA} (a distributed checkpoint). Pass the --save "
            f"directory of a run that saved one.")


def check_resume_checkpoint(path: str) -> None:
    if os.path.exists(path):  # absent: nothing to resume, the run starts from scratch
        _check_checkpoint_directory(path)


def _check_checkpoint_directory(path: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' is a file; a checkpoint is a directory (the --save directory "
                          f"of a run, holding {TRACKER_FILENAME}).")
    try:
        os.listdir(path)
    except OSError as error:
        raise ConfigError(f"'{path}' cannot be read ({error.strerror}).") from None
    read_tracker(path)


def check_hf_folder(path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"'{path}' does not exist{_relative(path)}; check the path.")
    if not os.path.isdir(path):
        raise ConfigError(f"'{path}' is a file; a Hugging Face model is a folder holding "
                          f"{HF_CONFIG} and its weights.")
    config = os.path.join(path, HF_CONFIG)
    if not os.path.isfile(config):
        raise ConfigError(f"'{path}' is not a Hugging Face model folder: it has no {HF_CONFIG}.")
    try:
        with open(config, encoding="utf-8") as f:
            values = json.load(f)
    except (ValueError, OSError) as error:
        raise ConfigError(f"'{config}' is not valid JSON ({error}): the folder is damaged or "
                          f"was not written completely; export it again.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"'{config}' is not a JSON object: export the folder again.")
    _check_hf_weights(path)


def _check_hf_weights(path: str) -> None:
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
            raise ConfigError(f"'{index}' is not a safetensors index ({error}).") from None
    elif os.path.isfile(os.path.join(path, SAFETENSORS_FILE)):
        shards = [SAFETENSORS_FILE]
    elif any(os.path.isfile(os.path.join(path, name)) for name in TORCH_WEIGHT_FILES):
        return  # transformers' pickled weights: read (and checked) only by transformers
    else:
        raise ConfigError(f"'{path}' has {HF_CONFIG} but no weights ({SAFETENSORS_FILE}, "
                          f"{SAFETENSORS_INDEX} or {TORCH_WEIGHT_FILES[0]}).")
    for shard in shards:
        _check_safetensors_file(os.path.join(path, shard))


def _check_safetensors_file(path: str) -> None:
    """The file holds the bytes its header announces (a copy cut short is refused here, not
    half-way through reading the weights)."""
    if not os.path.isfile(path):
        raise ConfigError(f"'{path}' is missing (its folder's index names it).")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length)) if 8 + length <= size else None
    except (struct.error, ValueError, OSError):
        header = None
    if not isinstance(header, dict):
        raise ConfigError(f"'{path}' is not a safetensors file (no readable header): it is "
                          f"damaged or was cut short; export the folder again.")
    end = max((entry["data_offsets"][1] for name, entry in header.items()
               if name != "__metadata__" and isinstance(entry, dict)
               and isinstance(entry.get("data_offsets"), list)), default=0)
    if size < 8 + length + end:
        raise ConfigError(f"'{path}' is {size} bytes, but its header describes "
                          f"{8 + length + end}: the file was cut short; export the folder "
                          f"again.")


def check_checkpoint_or_hf_folder(path: str) -> None:
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        check_hf_folder(path)
    else:
        check_checkpoint(path)


def check_tokenizer_model(path: str) -> None:
    if not os.path.exists(path) and os.path.splitext(path)[1] not in (".model", ".vocab"):
        raise ConfigError(
            f"'{path}' does not exist{_relative(path)}: a tokenizer model is a SentencePiece "
            f".model file or a local Hugging Face tokenizer folder (nothing is downloaded from "
            f"the Hugging Face hub: fetch one where there is network, e.g. `hf download NAME "
            f"--local-dir tokenizers/NAME`, and pass that folder).")
    if not os.path.isdir(path):
        check_sentencepiece_model(path)
        return
    try:
        hf_tokenizer_files(path)  # HuggingFaceTokenizer's folder
    except UserError:
        raise ConfigError(
            f"'{path}' is a directory without a Hugging Face tokenizer (no tokenizer.json or "
            f"tokenizer_config.json): pass the SentencePiece .model file itself, or the folder a "
            f"Hugging Face tokenizer was saved to (with --tokenizer-type "
            f"HuggingFaceTokenizer).") from None


# ------------------------------------------------------------------------ the kinds
@dataclass(frozen=True)
class PathKind:
    name: str
    what: str
    """How --help and messages call such a path."""
    check: Callable[[str], None]


PATH_KINDS: Dict[str, PathKind] = {kind.name: kind for kind in (
    PathKind("input_file", "an input file", check_input_file),
    PathKind("input_folder", "an input folder", check_input_folder),
    PathKind("data_prefix", "a data prefix (.bin/.idx)", check_data_prefix),
    PathKind("checkpoint", "a megatron checkpoint", check_checkpoint),
    PathKind("resume_checkpoint", "a checkpoint to resume, if any", check_resume_checkpoint),
    PathKind("hf_folder", "a Hugging Face model folder", check_hf_folder),
    PathKind("checkpoint_or_hf_folder", "a megatron checkpoint or a Hugging Face folder",
             check_checkpoint_or_hf_folder),
    PathKind("tokenizer_model", "a tokenizer model", check_tokenizer_model),
    PathKind("output_file", "an output file", check_output_file),
    PathKind("output_folder", "an output folder", check_output_folder),
)}


def check_path(kind: str, value: str) -> None:
    """Raise a UserError when `value` is not a path of `kind` (see the module docstring)."""
    value = os.fspath(value)
    if kind != "data_prefix":  # a prefix names two files, which its own check looks at
        check_link(value)
    PATH_KINDS[kind].check(value)


def path_problem(kind: str, flag: str, value: str) -> Optional[str]:
    """Why `value` cannot be `flag`'s path (the flag itself left out of the text), or None."""
    try:
        check_path(kind, value)
    except UserError as error:
        text = str(error)
        return text[len(flag):].lstrip(" :") if text.startswith(flag + " ") else text
    return None

"""The completion marker of a checkpoint directory: ``manifest.json``, written last.

It lists every file of the checkpoint with its size and CRC-32. A directory without it is an
interrupted save and is never loaded; a listed file that is missing, has another size or another
checksum is named in the error before anything is loaded. (torch_dist shards are raw tensor
bytes: a flipped byte would otherwise load silently as a wrong weight.)

Computing and checking the checksums reads the whole checkpoint once, so the work is split
over the ranks: rank r handles files r, r + W, r + 2W, ... and the results are pooled. When
saving, the same pass fsyncs every file, so the manifest is only written once all the data it
describes is on stable storage.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional

from . import _dist
from .atomic import atomic_write_text, fsync_path
from .naming import MANIFEST_FILENAME, TMP_INFIX

FORMAT = "spannorm_megatron.checkpoint/1"
_CHUNK = 8 << 20


def _crc32(path: str, sync: bool = False) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
        if sync:
            os.fsync(f.fileno())
    return f"{crc:08x}"


def _list_files(directory: str) -> List[str]:
    """Relative paths of all files under `directory`, sorted (temporary files excluded)."""
    files = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            if TMP_INFIX in name or name == MANIFEST_FILENAME:
                continue
            files.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(files)


def collect_entries(directory: str) -> Dict[str, dict]:
    """Size and CRC-32 of every file in `directory`, each file fsynced on the way (collective)."""
    files = _dist.on_rank0(lambda: _list_files(directory))
    mine = {}
    for rel in files[_dist.rank()::_dist.world_size()]:
        path = os.path.join(directory, rel)
        mine[rel] = {"size": os.path.getsize(path), "crc32": _crc32(path, sync=True)}
    entries: Dict[str, dict] = {}
    for part in _dist.all_gather(mine):
        entries.update(part)
    return {rel: entries[rel] for rel in files}


def write(directory: str, iteration: int, entries: Dict[str, dict], nonce: str) -> None:
    """Write the manifest (rank 0 only), then make the directory entry itself durable."""
    manifest = {"format": FORMAT, "iteration": iteration, "files": entries}
    atomic_write_text(os.path.join(directory, MANIFEST_FILENAME),
                      json.dumps(manifest, indent=1, sort_keys=True) + "\n", nonce)
    fsync_path(directory)


def read(directory: str) -> Optional[dict]:
    """The manifest of `directory`, or None when it is absent or unreadable (incomplete save)."""
    try:
        with open(os.path.join(directory, MANIFEST_FILENAME)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def is_complete(directory: str) -> bool:
    return os.path.isdir(directory) and read(directory) is not None


def problems(directory: str, manifest: dict, checksums: bool = True) -> List[str]:
    """What is wrong with the files `manifest` lists, one line per bad file (collective).

    Sizes are always checked; with `checksums` every file is also read and its CRC-32
    compared. Every rank returns the same list.
    """
    files = sorted(manifest["files"])
    found = []
    for rel in files[_dist.rank()::_dist.world_size()]:
        expected = manifest["files"][rel]
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            found.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            found.append(f"{path} has {size} bytes, the manifest says {expected['size']} "
                         f"(truncated or overwritten)")
            continue
        crc = _crc32(path) if checksums else expected["crc32"]
        if crc != expected["crc32"]:
            found.append(f"{path} is corrupted (CRC-32 {crc}, the manifest says "
                         f"{expected['crc32']})")
    pooled = [line for part in _dist.all_gather(found) for line in part]
    return sorted(pooled)

"""Keep only one GPU architecture's device code in a shared library (what `nvprune` does for
object files and static libraries, which it cannot do for a shared library).

    python tools/gpu/prune_fatbin.py IN.so OUT.so [--arch 90]
    python tools/gpu/prune_fatbin.py IN.so --list

Transformer Engine's CUDA 13 core library (`libtransformer_engine.so`, 463 MB, 171 MiB as a
wheel) holds its kernels for sm_75, 80, 89, 90, 100, 103 and 120 plus PTX; the GPU machine we
are lent is a Hopper (sm_90), which loads only the sm_90 images. This rewrites each fatbin in
the `.nv_fatbin` section in place: its header, the entries kept, then zeros up to the fatbin's old
end, with the header's size set to what was kept. No offset anywhere in the ELF file changes
(the host code and the runtime's pointers to each fatbin stay valid), and the zeros compress to
nothing (xz: 8.4 MiB for TE 2.11's library).

Kept in each fatbin: every ELF (cubin) entry for ARCH (sm_90 and the arch-specific sm_90a alike).
A fatbin with no such cubin keeps the PTX of the highest architecture <= ARCH (the driver
compiles it when the module loads), and one with neither is left whole.

Layout read (CUDA's fatbin format, as `cuobjdump` reads it): a fatbin is a 16-byte header
(magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries that follow); each entry
is a header (u16 kind: 1 PTX, 2 ELF; u16; u32 header size; u64 payload size; ...; u32 arch at
offset 28) followed by its payload. Fatbins follow each other, 8-byte aligned.
"""

from __future__ import annotations

import argparse
import collections
import struct
import subprocess
import sys
from typing import Iterator, List, Tuple

MAGIC = 0xBA55ED50
KINDS = {1: "PTX", 2: "ELF"}


def section(path: str, name: str) -> Tuple[int, int]:
    """(file offset, size) of an ELF section, read with readelf."""
    listing = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True,
                             check=True).stdout
    for line in listing.splitlines():
        if f" {name} " in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"error: {path} has no {name} section (no device code)")


def fatbins(data, start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(offset, header size, entries size) of each fatbin in data[start:end]."""
    pos = start
    while pos + 16 <= end:
        magic, _, header_size, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            if any(data[pos:pos + 8]):
                raise SystemExit(f"error: no fatbin header at offset {pos:#x}: not a layout "
                                 "this tool knows, nothing written")
            pos += 8
            continue
        yield pos, header_size, size
        pos = (pos + header_size + size + 7) & ~7


def entries(data, start: int, end: int) -> List[Tuple[int, int, int, int]]:
    """(kind, arch, offset, length) of each entry between start and end."""
    found, pos = [], start
    while pos < end:
        kind, _, header_size, payload = struct.unpack_from("<HHIQ", data, pos)
        (arch,) = struct.unpack_from("<I", data, pos + 28)
        if header_size == 0 or pos + header_size + payload > end:
            raise SystemExit(f"error: malformed fatbin entry at offset {pos:#x}")
        found.append((kind, arch, pos, header_size + payload))
        pos += header_size + payload
    return found


def listing(path: str) -> None:
    data = open(path, "rb").read()
    start, size = section(path, ".nv_fatbin")
    total = collections.Counter()
    count = collections.Counter()
    blobs = 0
    for pos, header_size, entries_size in fatbins(data, start, start + size):
        blobs += 1
        for kind, arch, _, length in entries(data, pos + header_size,
                                             pos + header_size + entries_size):
            total[(KINDS.get(kind, str(kind)), arch)] += length
            count[(KINDS.get(kind, str(kind)), arch)] += 1
    print(f"{path}: .nv_fatbin {size / 2**20:.1f} MiB in {blobs} fatbins")
    for key in sorted(total, key=lambda k: (k[1], k[0])):
        print(f"  {key[0]} sm_{key[1]}: {count[key]} entries, {total[key] / 2**20:.1f} MiB")


def prune(source: str, target: str, arch: int) -> None:
    data = bytearray(open(source, "rb").read())
    start, size = section(source, ".nv_fatbin")
    blobs = kept = dropped = 0
    kept_bytes = 0
    for pos, header_size, entries_size in list(fatbins(data, start, start + size)):
        blobs += 1
        body, end = pos + header_size, pos + header_size + entries_size
        items = entries(data, body, end)
        keep = [item for item in items if item[0] == 2 and item[1] == arch]
        if not keep:
            ptx = [item for item in items if item[0] == 1 and item[1] <= arch]
            keep = [max(ptx, key=lambda item: item[1])] if ptx else items
        new = b"".join(bytes(data[offset:offset + length]) for _, _, offset, length in keep)
        data[body:end] = new + bytes(entries_size - len(new))
        struct.pack_into("<Q", data, pos + 8, len(new))
        kept += len(keep)
        dropped += len(items) - len(keep)
        kept_bytes += len(new)
    with open(target, "wb") as f:
        f.write(data)
    print(f"{target}: {blobs} fatbins, kept {kept} entries for sm_{arch} "
          f"({kept_bytes / 2**20:.1f} MiB of {size / 2**20:.1f} MiB), dropped {dropped}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source")
    p.add_argument("target", nargs="?")
    p.add_argument("--arch", type=int, default=90, help="Compute capability x 10 (H100/H200: 90).")
    p.add_argument("--list", action="store_true", help="Only list the device code per arch.")
    args = p.parse_args(argv)
    if args.list or not args.target:
        listing(args.source)
        return 0
    prune(args.source, args.target, args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())

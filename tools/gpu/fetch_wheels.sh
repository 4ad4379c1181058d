#!/usr/bin/env bash
# Run HERE (a machine with the package registry): download what a GPU machine without network
# needs to run this stack with Transformer Engine, into .whl/ (in .gitignore), and split it into
# parts small enough for one device call's carry (64 MiB per call, working tree included).
#
#   bash tools/gpu/fetch_wheels.sh            # then see docs/gpu.md for the device calls
#
# Transformer Engine 2.11.0: the newest megatron-core 0.16.1 accepts (its "dev" extra pins
# >=2.9,<2.12). The core wheel (CUDA 13 build) is about 171 MiB; the PyTorch extension is a
# source package, built on the device against its own torch (tools/gpu/device.sh install).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
te=${TE_VERSION:-2.11.0}
part_mib=${PART_MIB:-48}
out=.whl
rm -rf "$out" && mkdir -p "$out/files"

platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "== downloading wheels for Python 3.12 / x86-64 (Transformer Engine $te)"
python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d "$out/files" \
  "transformer_engine==$te" "transformer_engine_cu13==$te" megatron-core==0.16.1 \
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0
echo "== downloading the source of transformer_engine_torch $te"
python3 -m pip download -q --no-deps --no-binary transformer_engine_torch -d "$out/files" \
  "transformer_engine_torch==$te"

echo "== packing into ${part_mib} MiB parts"
tar -C "$out/files" -cf "$out/bundle.tar" .
split -b "${part_mib}M" -d -a 2 "$out/bundle.tar" "$out/bundle.tar.part-"
rm "$out/bundle.tar"
i=0
for piece in "$out"/bundle.tar.part-*; do
  i=$((i + 1))
  mkdir -p "$out/part-$i" && mv "$piece" "$out/part-$i/"
done
(cd "$out/files" && sha256sum ./* > ../SHA256SUMS)
rm -rf "$out/files"
mkdir -p "$out/sums" && mv "$out/SHA256SUMS" "$out/sums/"
du -sh "$out"/part-* "$out/sums"
echo "$i parts: carry .whl/part-1 ... .whl/part-$i one per call, with .whl/sums in the last (docs/gpu.md)"

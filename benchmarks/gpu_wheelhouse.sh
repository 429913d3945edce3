#!/usr/bin/env bash
# Build the wheelhouse that benchmarks/gpu_check.py needs on a GPU machine without network.
#
#   bash benchmarks/gpu_wheelhouse.sh [DEST]        # DEST defaults to .whl (git-ignored)
#
# The GPU image already holds torch, torchvision, timm, numpy, pyarrow, pillow, fsspec, pyyaml,
# regex, tqdm, huggingface_hub, safetensors, jaxtyping, wadler-lindig, packaging and
# typing-extensions (see benchmarks/README.md); these wheels are what it lacks for the check's
# code path: open_clip (models) with ftfy/wcwidth, zarr with numcodecs, donfig and google-crc32c
# (the store), braceexpand (shard patterns). No Ray, no webdataset: the check runs in-process and
# clipscope reads tar shards itself. Versions are those installed in this checkout's .venv (what
# the tests ran with); wheels are for CPython $PYVER (default 3.12, the GPU image's python3) on
# manylinux x86-64. Prints the folder's size: the device tool carries at most 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
pyver=${PYVER:-3.12}
python=${PYTHON:-.venv/bin/python}
names=(open_clip_torch ftfy wcwidth zarr numcodecs donfig google-crc32c braceexpand)
pins=()
for name in "${names[@]}"; do
    version=$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    pins+=("$name==$version")
done
rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${pins[@]}"
ls -1 "$dest"
du -sh "$dest"

#!/usr/bin/env bash
# Copies the shared libraries modelgate needs at run time out of the Python environment
# that holds torch (the one the binary was built against), for a runtime image that carries
# no Python:
#
#   DEST/torch/lib/*.so*          libtorch, libc10, libgomp... (libtorch_python.so left out)
#   DEST/nvidia/<pkg>/lib/*.so*   CUDA wheels only: cuBLAS, cuDNN, NCCL...
#
# The layout is torch's own: its libraries find NVIDIA's through rpaths relative to
# themselves ($ORIGIN/../../nvidia/<pkg>/lib), so they work wherever DEST lies. The binary
# finds DEST/torch/lib through LD_LIBRARY_PATH (see the Dockerfiles).
#
# usage: docker/stage-libtorch.sh PYTHON DEST [BINARY]
#   PYTHON  the interpreter of the environment holding torch, e.g. /opt/venv/bin/python
#   DEST    an empty or missing directory
#   BINARY  if given, fail unless every library it loads resolves from DEST or the system
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
python=$1
dest=$2
binary=${3:-}

# find_spec, not `import torch`: locating the package is enough and takes no seconds.
torch_dir=$("$python" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])')
site=$(dirname "$torch_dir")

mkdir -p "$dest/torch/lib"
find "$torch_dir/lib" -maxdepth 1 -name '*.so*' ! -name 'libtorch_python.so' \
    -exec cp -a {} "$dest/torch/lib/" \;
if [ -d "$site/nvidia" ]; then
    # Shared libraries only: the wheels' headers and static archives are build-time files.
    (cd "$site" && find nvidia -path 'nvidia/*/lib/*' -name '*.so*' -print0 |
        xargs -0 --no-run-if-empty cp -a --parents -t "$dest")
fi

if [ -n "$binary" ]; then
    resolved=$(LD_LIBRARY_PATH="$dest/torch/lib" ldd "$binary")
    if grep -q 'not found' <<<"$resolved"; then
        echo "stage-libtorch: $binary needs libraries that were not staged:" >&2
        grep 'not found' <<<"$resolved" >&2
        exit 1
    fi
    # Every torch or NVIDIA library must come from DEST, not from the build environment.
    if grep -E 'lib(torch|c10|cu|nccl|nvshmem)' <<<"$resolved" | grep -v -F "=> $dest/" >&2; then
        echo "stage-libtorch: the libraries above resolve outside $dest" >&2
        exit 1
    fi
fi
du -sh "$dest"

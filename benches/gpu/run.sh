#!/usr/bin/env bash
# The GPU measurements of the PyTorch 2 and residency issues in one run, on a machine the
# `device` tool lends (a bare GPU machine with torch in its python3 and no network).
#
# Here:  make gpu-bundle      (the release binary and the bench, stripped, into .gpu/)
# There: bash benches/gpu/run.sh [checks] [formats] [hosttier] [images]
#        (default: checks formats hosttier)
#        from the repository root, with .gpu carried; logs go to $OUT (default /tmp/out).
#        CHECK_DEVICE=cpu runs the checks on the CPU, to try this script on a machine without a GPU.
#
# checks:  benches/gpu/check.py cuda (CUDA packages and TorchScript against PyTorch's own
#          outputs, concurrent rows, measured CUDA footprints, unpack directories removed on
#          unload, on-demand loads and evictions in a cuda:0 budget);
# formats: table 6 on the GPU (mlp and ResNet-50 as TorchScript, frozen TorchScript and
#          packages the bench compiles there, served next to their raw forwards);
# hosttier: benches/gpu/host_tier.py cuda (ResNet-50 back from host memory vs reloaded, in
#          PyTorch itself: the facts a host tier in the server needs);
# images:  tables 4 and 5 (ResNet-50 served vs raw, host CPU per image).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cd "$ROOT"
PY=$(command -v "${PYTHON:-python3}")
say() { echo "== $(date +%T) $*"; }
[ -x .gpu/modelgate ] && [ -x .gpu/serving ] || { echo "no .gpu/: run make gpu-bundle here first"; exit 2; }

# The binaries link libtorch through the rpath of the build machine's venv: use this one's.
export LD_LIBRARY_PATH=$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
# The bench finds the repository, the server and .venv/bin/python by the paths it was built
# with: make those paths reach this copy.
BUILT=$(cat .gpu/root)
if [ "$BUILT" != "$ROOT" ]; then
  if [ -e "$BUILT" ] && [ ! -L "$BUILT" ]; then echo "$BUILT exists here: cannot link it"; exit 2; fi
  mkdir -p "$(dirname "$BUILT")" && ln -sfn "$ROOT" "$BUILT"
fi
mkdir -p target/release
cp .gpu/modelgate target/release/modelgate
chmod +x target/release/modelgate .gpu/serving
# The bench runs .venv/bin/python. A bare machine has none: write a wrapper of $PY there,
# never over a real venv's (it is a link into an interpreter: writing through it would
# replace the interpreter).
if [ ! -e .venv/bin/python ] || grep -qs "modelgate run.sh" .venv/bin/python; then
  mkdir -p .venv/bin && rm -f .venv/bin/python
  printf '#!/bin/sh\n# written by modelgate run.sh\nexec %s "$@"\n' "$PY" > .venv/bin/python
  chmod +x .venv/bin/python
fi

nvidia-smi -L || echo "(no nvidia-smi here)"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
ldd target/release/modelgate | grep -E "not found" && exit 2
status=0
for step in ${@:-checks formats hosttier}; do
  say "$step"
  case $step in
    checks) PYTHONUNBUFFERED=1 "$PY" benches/gpu/check.py "${CHECK_DEVICE:-cuda}" 2>&1 | tee "$OUT/checks.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    formats) .gpu/serving formats 2>&1 | tee "$OUT/formats.log" ;;
    hosttier) dir=target/bench-pt2-cuda  # made by the formats step, or here
            if [ "${CHECK_DEVICE:-cuda}" = cuda ] && [ ! -f $dir/resnet50_aoti/1/model.pt2 ]; then
              "$PY" models/bench_pt2.py export $dir cuda > /dev/null
            fi
            "$PY" benches/gpu/host_tier.py "${CHECK_DEVICE:-cuda}" 2>&1 | tee "$OUT/hosttier.log" ;;
    images) "$PY" models/generate.py bench target/bench-models > /dev/null &&
            .gpu/serving images 2>&1 | tee "$OUT/images.log" ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
say "done (status $status)"
exit $status

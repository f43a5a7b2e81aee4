#!/usr/bin/env bash
# The checks to run on a machine with a CUDA GPU, one step per call (each well inside 10 minutes):
#   scripts/gpu_check.sh tests        the CUDA tests (real and emulated device) and a one-line device report
#   scripts/gpu_check.sh bench SIZE   the engine benchmark on the GPU (SIZE 0.5b or 1.5b, T = 3, no mergekit)
# Figures go to $OUT (the device tool's folder) or ./gpu-check. It uses the python3 on PATH as it is: torch
# with CUDA and neuromerge's dependencies installed (the GPU machines' image has them), nothing built or fetched;
# the C kernels are not needed (the GPU runs the torch path).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 30, 'GiB')" \
    | tee "$out/device.txt"
case "${1:-}" in
tests)
    python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_emulated_cuda.py tests/test_engine.py \
        tests/test_engine_stream.py tests/test_neuromerging.py tests/test_chunking.py 2>&1 | tee "$out/tests.txt"
    ;;
bench)
    size=${2:?"bench needs a size: 0.5b or 1.5b"}
    python3 scripts/bench_engine.py --size "$size" --tasks 3 --scratch /tmp/nmbench --no-mergekit --repeat 2 \
        --neuromerge-args "--device cuda" --json "$out/bench-$size.json" 2>&1 | tee "$out/bench-$size.txt"
    ;;
*)
    echo "usage: scripts/gpu_check.sh tests | bench 0.5b | bench 1.5b" >&2
    exit 2
    ;;
esac

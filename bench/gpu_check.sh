#!/usr/bin/env bash
# On a machine with a CUDA GPU, with dckpt's dependencies installed: the CUDA tests, then
# bench_gpu.py (both import dckpt from this checkout). About 5 minutes on one H200 with
# the defaults; PARAMS_M and ROUNDS resize the benchmark. Exits non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2
# Only the files that hold CUDA tests are collected: the rest of the suite needs test
# dependencies (moto, the trainers) that a GPU image may lack.
mapfile -t files < <(grep -l "pytest.mark.cuda" tests/test_*.py)
python3 -m pytest -q -m cuda -p no:cacheprovider "${files[@]}"
tests=$?
python3 bench/bench_gpu.py --params-m "${PARAMS_M:-500}" --rounds "${ROUNDS:-3}"
bench=$?
echo "gpu_check: CUDA tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

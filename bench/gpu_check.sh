#!/usr/bin/env bash
# On a machine with a CUDA GPU, once dckpt is installed (pip install -e '.[dev]'): the CUDA
# tests, then bench_gpu.py. About 5 minutes on one H200 with the defaults; PARAMS_M and
# ROUNDS resize the benchmark. Exits non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 2
python3 -m pytest -q -m cuda -p no:cacheprovider
tests=$?
python3 bench/bench_gpu.py --params-m "${PARAMS_M:-500}" --rounds "${ROUNDS:-3}"
bench=$?
echo "gpu_check: CUDA tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]

#!/usr/bin/env bash
# One prepared run for a session that has a GPU machine (see the GPU-validation issue): the test suite
# on CUDA (gpu-marked tests included), the block-size sweep and the quick benchmark suite, each under
# its own time limit so that a slow step cannot eat the whole device budget. Outputs go under $OUT
# (the device tool's folder) or benchmarks/results/gpu-session; commit them from the developer machine.
#   PYTHONPATH=. bash benchmarks/gpu_session.sh            # about 10 minutes on an H200
set -u
OUT=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi -L | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python -m pytest -q -p no:logging -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
echo "pytest exit $?" | tee -a "$OUT/gpu.txt"; tail -5 "$OUT/pytest.log"
timeout 150 python -m benchmarks.sweep_blocks --out "$OUT/block_sweep.csv" > "$OUT/sweep.log" 2>&1
echo "sweep exit $?" | tee -a "$OUT/gpu.txt"
timeout 180 python -m benchmarks --quick --providers csd-ss csd-ts csd-us kl-forward naive-kl \
    --out "$OUT/suite" > "$OUT/suite.log" 2>&1
echo "suite exit $?" | tee -a "$OUT/gpu.txt"; tail -3 "$OUT/suite.log"

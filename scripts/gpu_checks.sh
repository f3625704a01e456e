#!/usr/bin/env bash
# One prepared GPU run (the device tool's machine): GPU tests and the kernel / trainer / adjoint benchmarks.
# Needs diffusers' wheel in .whl/ (the image lacks it); results and logs go to $OUT (default: gpu_out/).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 80 python3 -m pytest -m gpu tests/kernels tests/samplers/test_dpm_solver_v3.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
timeout 150 python3 scripts/bench_attention.py --device cuda --dtype fp16 --repeats 5 --out "$OUT/attention_gpu_fp16" 2>&1 | tee "$OUT/bench_attention.log" | grep -v "^round"
timeout 100 python3 scripts/bench_trainer.py --device cuda --steps 10 --warmup 3 2>&1 | tee "$OUT/bench_trainer.log" | tail -12
timeout 80 python3 scripts/bench_adjoint_memory.py --device cuda 2>&1 | tee "$OUT/bench_adjoint.log" | tail -12
# DPM-Solver-v3 EMS of the embedded models at the paper's settings (1200 lambda steps, 4096 samples)
timeout 90 python3 -m diffalign ems --model digits --device cuda --batch-size 4096 --out "$OUT/ems_digits" --quiet 2>&1 | tail -2
timeout 50 python3 -m diffalign ems --model gmm --device cuda --batch-size 4096 --out "$OUT/ems_gmm" --quiet 2>&1 | tail -2

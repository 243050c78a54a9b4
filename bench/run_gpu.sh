#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/performance.md ("On a GPU"), in one go, on one GPU:
#   bash bench/run_gpu.sh [LOG_DIR]     (python3: a CUDA build of torch, with DeepSpeed, transformers)
# Each step has a time limit and a failing step does not stop the others; everything goes to
# LOG_DIR/gpu.log (default: the current folder). About 10 minutes on an H100 before the bf16
# trainer step was added; where one call may run 10 minutes at most, run it over two calls.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
exec > >(tee "${1:-.}/gpu.log") 2>&1
t0=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - t0)) s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
step tests; timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -30
for dtype in fp32 bf16; do
    step fused loss $dtype
    timeout 150 $PY bench/bench_fused_loss.py --tokens 2048 8192 32768 --vocab 49152 151936 --dim 576 3584 \
        --repeat 2 --dtype $dtype
done
for dtype in fp32 bf16; do
    step attention $dtype
    timeout 120 $PY bench/bench_attention.py --length 4096 --samples 8 --window 256 --repeat 5 --dtype $dtype
done
step trainer fp32; timeout 150 $PY bench/bench_trainer.py --rows 96 --batch 8 --pad-batch 4 --pack-length 2048 --pack-iters 6
step trainer bf16; timeout 150 $PY bench/bench_trainer.py --rows 96 --batch 8 --pad-batch 4 --pack-length 2048 --pack-iters 6 \
    --cases ours-ce ours-idft ours-pad ours-pack --deepspeed-config ds_configs/zero1_bf16.json
step decoding; timeout 100 $PY bench/bench_decoding.py --new-tokens 256 --naive-tokens 256 --naive-examples 1 --batches 1 8 32
step recompute; timeout 100 $PY bench/bench_recompute.py --tp 1 --seq-length 4096 --iters 3
step done

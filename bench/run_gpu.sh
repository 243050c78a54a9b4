#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/performance.md ("On a GPU"), on one GPU:
#   bash bench/run_gpu.sh [LOG_DIR] [decode|tests|1|2|all]   (python3: a CUDA build of torch, with DeepSpeed, transformers)
# Each part fits one call, where a call may run 10 minutes, with room for a cold start: "decode"
# (about 3 minutes) is the decoding tests, then eager and graphed decoding side by side; "tests"
# the other GPU tests (about 4 minutes at most, torch.compile's kernels built cold); part 1 the
# loss and attention benches, part 2 the trainer and recomputation benches and a TP rank's
# two-pass loss (each at most about 8 minutes: the time limits below; the 2026-11-26 runs' steps
# took less). All but part 1 need the model (the tests' tiny models take the SmolLM2 tokenizer).
# The trainer runs log torch.compile's recompilations (the flex backend's). Each step has a time
# limit and a failing step does not stop the others; everything goes to LOG_DIR/gpu-PART.log
# (default: the current folder). pytest is stopped with SIGINT, so that it still prints its failures.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
PART=${2:-all}
mkdir -p "${1:-.}"
exec > >(tee "${1:-.}/gpu-$PART.log") 2>&1
TEE=$!
t0=$(date +%s)
step() { echo; echo "=== [$(($(date +%s) - t0)) s] $*"; }

tests() {
    step "tests, but the decoding ones (part decode runs those)"
    timeout -s INT -k 20 240 $PY -m pytest -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_gpu.py \
        -k "not (generation or cuda_graph or host_copy or sampling)" 2>&1
}

part1() {
    step chunk kernels, Triton against eager
    timeout 40 $PY bench/bench_fused_loss.py --chunk-sums --vocab 49152 151936 --chunk-size 1024 --repeat 10 --dtype bf16
    for dtype in fp32 bf16; do
        step fused loss $dtype
        timeout 90 $PY bench/bench_fused_loss.py --tokens 2048 8192 32768 --vocab 49152 151936 --dim 576 3584 \
            --repeat 2 --dtype $dtype --cases floor naive unfused fused fused-ce torch-lce
    done
    for dtype in fp32 bf16; do
        step attention $dtype
        timeout 100 $PY bench/bench_attention.py --length 4096 --samples 8 --window 256 --repeat 3 --dtype $dtype
    done
}

part2() {
    step trainer fp32
    TORCH_LOGS=recompiles timeout 170 $PY bench/bench_trainer.py --rows 96 --batch 8 --pad-batch 4 \
        --pack-length 2048 --pack-iters 12 --cases hf ours-ce ours-idft ours-pad ours-pack ours-pack-flex
    step trainer bf16
    TORCH_LOGS=recompiles timeout 200 $PY bench/bench_trainer.py --rows 96 --batch 8 --pad-batch 4 \
        --pack-length 2048 --pack-iters 12 --cases ours-ce ours-ce-unfused ours-idft ours-pad ours-pack ours-pack-flex \
        --deepspeed-config ds_configs/zero1_bf16.json
    step recompute; timeout 100 $PY bench/bench_recompute.py --tp 1 --seq-length 4096 --iters 3
    step fused loss bf16, the two passes of a TP rank
    timeout 45 $PY bench/bench_fused_loss.py --tokens 8192 --vocab 49152 151936 --dim 576 3584 --repeat 2 \
        --dtype bf16 --cases floor fused fused-tp fused-tp-eager
}

decode() {
    step decoding tests
    timeout -s INT -k 20 60 $PY -m pytest -q -p no:cacheprovider -p no:logging --tb=short -rfE tests/test_gpu.py \
        -k "generation or cuda_graph or host_copy or sampling" 2>&1
    step decoding, eager and in a CUDA graph
    timeout 120 $PY bench/bench_decoding.py --new-tokens 256 --naive-tokens 256 --naive-examples 1 \
        --batches 1 8 32 --cuda-graph
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
case $PART in
    decode) decode ;;
    tests) tests ;;
    1) part1 ;;
    2) part2 ;;
    all) decode; tests; part1; part2 ;;
    *) echo "part: decode, tests, 1, 2 or all, not $PART"; exit 2 ;;
esac
step done
exec >&- 2>&-  # close tee's pipe and let it finish the log before the call ends
wait $TEE

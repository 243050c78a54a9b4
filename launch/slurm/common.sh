# What launch/slurm/*.sbatch share (sourced, not run): the rendezvous, the network settings, and
# `step`, which runs one srun step and requeues the job when the step saved and asked for it.
#
# Signals: `#SBATCH --signal=B:USR1@N` sends USR1 to this batch shell N seconds before the time
# limit; SIGTERM comes on preemption or scancel. Both are forwarded to the step's tasks, which
# finish the iteration (batch of rows) in progress, save, and exit with status 75
# (megatron_onpolicy/preempt.py: REQUEUE_EXIT). After USR1 (or the trainer's own
# --exit-duration-in-mins) this script then runs `scontrol requeue`, and the requeued job
# continues from what was saved (training: the newest complete checkpoint in --save). After TERM
# it does not: `scancel` means stop, and a preempting SLURM requeues the job itself where its
# PreemptMode says so. A resubmitted job continues the same way.

REQUEUE_EXIT=75
PYTHON=${PYTHON:-python}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export PYTHONUNBUFFERED=1

# The network settings users usually need on multi-node GPU clusters (uncomment and adapt):
# export NCCL_SOCKET_IFNAME=ib0          # the interface for NCCL's bootstrap (and gloo's: GLOO_SOCKET_IFNAME)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3             # RoCE
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA
# export NCCL_DEBUG=WARN                 # INFO to see the rings and transports chosen
# export NCCL_ASYNC_ERROR_HANDLING=1     # a rank that dies takes the job down instead of hanging it
# export TORCH_NCCL_BLOCKING_WAIT=0
# export CUDA_DEVICE_MAX_CONNECTIONS=1

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"

step() {  # step COMMAND...: one task per GPU (or per --ntasks on CPU) through srun
    srun --kill-on-bad-exit=1 "$@" &
    local pid=$! rc cancelled=0
    # srun passes USR1 on to every task of the step (TERM would make it kill them).
    trap "echo 'batch script: USR1, passed on to the tasks'; kill -USR1 $pid" USR1
    trap "echo 'batch script: TERM, passed on to the tasks as USR1'; cancelled=1; kill -USR1 $pid" TERM
    wait "$pid"
    rc=$?
    while kill -0 "$pid" 2>/dev/null; do  # `wait` returned early for a trapped signal
        wait "$pid"
        rc=$?
    done
    trap - USR1 TERM
    if [ "$rc" -eq "$REQUEUE_EXIT" ] && [ "$cancelled" -eq 0 ]; then
        echo "batch script: the step saved and asked to be requeued"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$rc"
}

#!/usr/bin/env python
"""Train with ce / dft / idft / eaft under TP x PP x DP on DeepSpeed.

    deepspeed --num_gpus N launch/pretrain_idft.py --model MODEL --train-data FILE \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P \
        --micro-batch-size m --global-batch-size g --train-iters K --loss idft \
        --save DIR --deepspeed_config ds_configs/zero1_fp32.json

Also under torchrun, mpirun or srun (the same flags); `--config FILE.yaml` takes the flags from
YAML. All flags: --help. What it writes: megatron_onpolicy/train/."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_onpolicy import cli  # noqa: E402
from megatron_onpolicy.train.args import TrainConfigError, parse_args  # noqa: E402
from megatron_onpolicy.train.loop import train  # noqa: E402

if __name__ == "__main__":
    args = parse_args()
    cli.run(lambda: train(args), "pretrain_idft", (TrainConfigError,))

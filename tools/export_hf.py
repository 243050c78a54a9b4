#!/usr/bin/env python
"""A training checkpoint -> a Hugging Face folder (TP and PP shards merged).

    deepspeed --num_gpus T*P tools/export_hf.py --load CKPT_DIR --out HF_DIR [--tag iter_0000100]

Run it on T x P processes, the layout the checkpoint was saved with (CKPT_DIR/TAG/complete.json
names it): each rank reads its own stage and shard through DeepSpeed, each stage merges its TP
shards, rank 0 writes the folder atomically. Default tag: the one `CKPT_DIR/latest` names (read by
rank 0 for every rank: a run still training may save a newer one while the ranks start)."""
import argparse
import os
import sys

from transformers.utils.hub import convert_file_size_to_int

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_onpolicy import cli  # noqa: E402
from megatron_onpolicy.train.args import TrainConfigError  # noqa: E402
from megatron_onpolicy.train.export import MAX_FILE_BYTES, export_checkpoint  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the --save folder of a training run")
    p.add_argument("--tag", help="a checkpoint in it (default: the latest)")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--model", help="the run's --model, if it is no longer where the checkpoint says")
    p.add_argument("--max-shard-size", type=convert_file_size_to_int, default=MAX_FILE_BYTES,
                   help="the largest safetensors file, as transformers' save_pretrained takes it (default 4GB)")
    cli.add_timeout_arg(p)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    cli.check_out(p, "--out", args.out, folder=True)
    return args


if __name__ == "__main__":
    args = parse_args()
    cli.run(lambda: export_checkpoint(args.load, args.tag, args.out, args.model, args.max_shard_size,
                                      args.distributed_timeout_minutes), "export_hf", (TrainConfigError,))

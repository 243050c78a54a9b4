#!/usr/bin/env python
"""Rows -> a memory-mapped indexed dataset that launch/pretrain_idft.py reads with --train-data PREFIX.

    python tools/preprocess_data.py --input FILE|FOLDER --output-prefix PREFIX --model MODEL \
        [--workers N] [--seq-length L [--overlong truncate|drop] [--pack]] [--prompt-key K --response-key K]

Writes PREFIX.bin (token ids and loss masks), PREFIX.idx (the index; with --pack the pack layout)
and PREFIX.json (tokenizer, chat template, source, settings). The format: megatron_onpolicy/data/indexed.py."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_onpolicy import cli  # noqa: E402
from megatron_onpolicy.data.preprocess import Settings, preprocess  # noqa: E402
from megatron_onpolicy.model.hub import resolve_model_path  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="preprocess_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL, Parquet or a datasets folder")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template to use")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seq-length", type=int, help="fit samples to this length (then training must use it too)")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate")
    p.add_argument("--pack", action="store_true", help="record a packing into rows of --seq-length")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--response-key", default="response")
    args = p.parse_args(argv)
    if args.workers < 1 or (args.seq_length is not None and args.seq_length < 1):
        p.error("--workers and --seq-length must be >= 1")
    if args.pack and not args.seq_length:
        p.error("--pack needs --seq-length")
    return args


def main(args) -> None:
    settings = Settings(args.prompt_key, args.response_key, args.seq_length, args.overlong, args.pack)
    meta = preprocess(args.input, args.output_prefix, resolve_model_path(args.model), settings, args.workers)
    packs = f", {meta['packs']} packs of {args.seq_length}" if args.pack else ""
    print(f"{args.output_prefix}.{{bin,idx,json}}: {meta['source']['rows']} rows -> {meta['samples']} samples "
          f"({meta['truncated']} truncated, {meta['dropped']} dropped){packs}, {meta['tokens']} tokens")


if __name__ == "__main__":
    args = parse_args()
    cli.run(lambda: main(args), "preprocess_data")

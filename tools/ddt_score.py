#!/usr/bin/env python
"""DDT statistics of a dataset under a model, sharded over data-parallel groups.

    deepspeed --num_gpus N tools/ddt_score.py --model MODEL --data FILE \
        --tensor-model-parallel-size T --out OUT.jsonl [--dump-tokens] [--micro-batch-size B] [--no-fused-loss] \
        [--keep-keys KEY ...] [--window ROWS]

Writes OUT.jsonl (one line per input row, input order: the row's fields, all or --keep-keys, then
its scores) and OUT.summary.json. Each data-parallel group streams its share of the rows, --window
at a time, sorted by length within the window (data/stream.py)."""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_onpolicy import cli, preempt  # noqa: E402
from megatron_onpolicy.data import DataError, tokenize_row  # noqa: E402
from megatron_onpolicy.data.stream import add_stream_args  # noqa: E402
from megatron_onpolicy.ddt import fused  # noqa: E402
from megatron_onpolicy.ddt.score import length_sorted_batches, row_keys, score_batch, summarize  # noqa: E402
from megatron_onpolicy.model.loader import load_arch, load_model, load_tokenizer  # noqa: E402
from megatron_onpolicy.outputs import check_writable, read_jsonl, write_json_atomic  # noqa: E402
from megatron_onpolicy.parallel import state  # noqa: E402
from megatron_onpolicy.rowpass import RowPass  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--out", required=True, help="output JSONL (OUT.summary.json is written beside it)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--no-eos", action="store_true",
                   help="score responses without the EOS target: text that was cut, not ended, where it stops")
    p.add_argument("--dump-tokens", action="store_true", help="also write token ids and per-token phi/logp/entropy")
    cli.add_fused_loss_args(p, "build the head's logits first (default: the head fused with the statistics, "
                               "chunked)", "statistics")
    p.add_argument("--keep-keys", nargs="*", metavar="KEY",
                   help="input fields each output line carries (default: all; none if given no KEY)")
    add_stream_args(p)
    args = p.parse_args(argv)
    cli.check_fused_loss_args(p, args)
    cli.check_out(p, "--out", args.out, folder=False)
    if args.micro_batch_size < 1:
        p.error(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    return args


def kept_fields(row, keep_keys, scores) -> dict:
    """The input row's fields an output line carries: all, or those named by --keep-keys. A field
    named like a score is an error, not silently overwritten."""
    if keep_keys is None:
        kept = row.data
    else:
        missing = [k for k in keep_keys if k not in row.data]
        if missing:
            raise DataError(f"{row.source}: field '{missing[0]}' (--keep-keys) missing")
        kept = {k: row.data[k] for k in keep_keys}
    clash = sorted(scores & kept.keys())
    if clash:
        raise DataError(f"{row.source}: field '{clash[0]}' has the name of a score; "
                        "name the fields to keep with --keep-keys")
    return kept


def main():
    args = parse_args()
    fused.set_kernels(args.fused_loss_kernel)
    stop = preempt.Stop()  # SIGTERM / SIGUSR1: finish the batch in progress, exit with status 75
    folder, arch = load_arch(args.model)
    cli.start(args.tensor_model_parallel_size, 1, arch.num_heads, arch.num_kv_heads, args.distributed_timeout_minutes)
    tokenizer = load_tokenizer(folder)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job = RowPass("ddt_score", args.data, out, cli.row_settings(args))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, _ = load_model(args.model, state.get_tensor_model_parallel_group(), dtype, cli.device())
    model.eval()
    scores = set(row_keys(args.dump_tokens))

    def prepare(i, row):  # -> (the sample to score, the input fields its output line carries)
        sample = tokenize_row(tokenizer, row.data, row.source, i, args.prompt_key, args.response_key,
                              eos=not args.no_eos)
        kept = kept_fields(row, args.keep_keys, scores)
        check_writable(kept, row.source)
        return sample, kept

    def batches(window):
        return length_sorted_batches(window, args.micro_batch_size, sample=lambda item: item[0])

    def process(batch):
        kept = {sample.index: fields for sample, fields in batch}
        for row in score_batch(model, [sample for sample, _ in batch], tokenizer.pad_token_id or 0, args.dump_tokens,
                               args.fused_loss, args.loss_chunk_size):
            yield row["index"], {**kept[row["index"]], **row}

    job.run(stop, args.window, prepare, batches, process)
    if dist.get_rank() == 0:
        with job.merged(out):
            summary = summarize(read_jsonl(out))
            summary_path = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
            write_json_atomic(summary_path, summary)
        print(json.dumps(summary, indent=2))
        print(f"wrote {out} and {summary_path}")


if __name__ == "__main__":
    cli.run(main, "ddt_score")

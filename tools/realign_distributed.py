#!/usr/bin/env python
"""Hinted-decoding realignment of a dataset: the model rewrites each reference answer itself.

    deepspeed --num_gpus N tools/realign_distributed.py --model MODEL --data FILE --out-dir DIR \
        --tensor-model-parallel-size T [--beta 3] [--lambda-mode linear|sigmoid|piecewise] ...

Rows are sharded over the N / T data-parallel groups, each streaming its share --window rows at a
time (data/stream.py) and appending finished rows to its own shard file (flushed per row), so a
restarted run, on any number of ranks, skips the rows already done. At the end rank 0
merges DIR/realigned.jsonl in input order, DIR/realigned.filtered.jsonl (the rows to train on:
those that ended with EOS, not by length or repetition, unless --keep-unfinished, and pass
--min-avg-phi / --require-answer-match) and DIR/summary.json."""
import argparse
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_onpolicy import cli, preempt  # noqa: E402
from megatron_onpolicy.data import DataError, tokenize_row  # noqa: E402
from megatron_onpolicy.data.stream import add_stream_args  # noqa: E402
from megatron_onpolicy.ddt.score import score_batch  # noqa: E402
from megatron_onpolicy.generate import (HintConfig, SamplingParams, hinted_decode, load_template,  # noqa: E402
                                        stop_token_ids)
from megatron_onpolicy.generate.answers import answers_match, reference_answer  # noqa: E402
from megatron_onpolicy.generate.sampling import batch_generator  # noqa: E402
from megatron_onpolicy.model.loader import load_arch, load_model, load_tokenizer  # noqa: E402
from megatron_onpolicy.outputs import (check_no_clash, check_writable, read_jsonl, write_json_atomic,  # noqa: E402
                                       write_jsonl_atomic)
from megatron_onpolicy.parallel import state  # noqa: E402
from megatron_onpolicy.rowpass import RowPass, batches_of  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    cli.add_data_args(p)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--answer-key", default="answer", help="field with the final answer, for answer_match")
    p.add_argument("--beta", type=cli.finite, default=3.0)
    p.add_argument("--lambda-mode", choices=["linear", "sigmoid", "piecewise"], default="linear")
    p.add_argument("--sigmoid-center", type=cli.finite, default=0.5)
    p.add_argument("--piecewise-bounds", type=cli.finite, nargs=2, default=(0.3, 0.7), metavar=("H1", "H2"))
    p.add_argument("--splitter", default="\\boxed{", help="after this text the plain stream alone decides ('' = never)")
    p.add_argument("--temperature", type=cli.finite, default=0.3, help="0 = greedy")
    p.add_argument("--top-p", type=cli.finite, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (each is two rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hint-template", help="file with {question} and {answer}; replaces the default hint prompt")
    p.add_argument("--analysis-template", help="file with {question} and {answer}; turns the analysis stage on")
    p.add_argument("--min-avg-phi", type=cli.finite,
                   help="realigned.filtered.jsonl: only rows at or above this avg phi")
    p.add_argument("--require-answer-match", action="store_true",
                   help="realigned.filtered.jsonl: only rows whose realigned answer matches")
    p.add_argument("--keep-unfinished", action="store_true",
                   help="realigned.filtered.jsonl: also rows that ended by length or repetition")
    cli.add_decoding_args(p)
    add_stream_args(p)
    args = p.parse_args(argv)
    cli.check_decoding_args(p, args)
    cli.check_out(p, "--out-dir", args.out_dir, folder=True)
    if not args.piecewise_bounds[0] < args.piecewise_bounds[1]:
        p.error("--piecewise-bounds H1 H2 needs H1 < H2")
    return args


OUTPUT_KEYS = ("realigned", "end_reason", "num_tokens", "mean_lam", "avg_phi_original", "avg_phi_realigned",
               "analysis", "answer_match")


def check_row(row, args) -> None:
    """A DataError for a row realignment cannot take (before any work on it)."""
    for key in (args.prompt_key, args.response_key):
        if key not in row.data:
            raise DataError(f"{row.source}: field '{key}' missing (realignment rewrites a row's "
                            f"'{args.response_key}' to its '{args.prompt_key}'; messages rows are not supported)")
    if args.require_answer_match and args.answer_key not in row.data:
        raise DataError(f"{row.source}: field '{args.answer_key}' missing (--require-answer-match compares "
                        "the realigned answer with it)")
    if args.answer_key in row.data:
        reference_answer(row, args.answer_key)
    check_no_clash(row, OUTPUT_KEYS)
    check_writable(row.data, row.source)  # the output row copies every field


def keep(row, args) -> bool:
    """Whether a row goes to realigned.filtered.jsonl, the file to train on."""
    if not row["realigned"].strip():
        return False  # nothing to train on (the model ended at once)
    if not args.keep_unfinished and row["end_reason"] != "eos":
        return False  # cut text: training on it would teach the model to stop there
    if args.min_avg_phi is not None and (row["avg_phi_realigned"] is None or row["avg_phi_realigned"] < args.min_avg_phi):
        return False
    return not args.require_answer_match or row.get("answer_match") is True


def summarize(rows, args):
    """One pass over the rows (streamed from the output file)."""
    means = {"mean_num_tokens": "num_tokens", "mean_lam": "mean_lam", "mean_avg_phi_original": "avg_phi_original"}
    n, ends, sums = 0, Counter(), dict.fromkeys(means, 0.0)
    realigned, done, matched, graded, kept = 0.0, 0, 0, 0, 0
    for r in rows:
        n += 1
        ends[r["end_reason"]] += 1
        for name, key in means.items():
            sums[name] += r[key]
        if r["avg_phi_realigned"] is not None:
            realigned, done = realigned + r["avg_phi_realigned"], done + 1
        if "answer_match" in r:
            matched, graded = matched + r["answer_match"], graded + 1
        kept += keep(r, args)
    mean = lambda total, count: total / count if count else None
    return {"rows": n, "end_reasons": dict(ends),
            **{name: mean(total, n) for name, total in sums.items()},
            "mean_avg_phi_realigned": mean(realigned, done), "answer_match_rate": mean(matched, graded),
            "filtered_rows": kept}


def realign_batch(model, tokenizer, batch, params, hint, hint_template, analysis_template, pad, args):
    """[(index, row, original Sample)] -> [(index, output row)]: each row's fields, its realigned
    answer and the DDT statistics of the original and the realigned answer."""
    indices = [i for i, _, _ in batch]
    data = [row.data for _, row, _ in batch]
    results = hinted_decode(model, tokenizer, [d[args.prompt_key] for d in data],
                            [d[args.response_key] for d in data], params, hint, hint_template,
                            analysis_template, batch_generator(args.seed, indices, cli.device()), args.cuda_graph)
    # DDT under the plain prompt, exactly as tools/ddt_score.py scores a response.
    # A response cut by length or repetition did not end there: no EOS target when scored.
    realigned = [tokenize_row(tokenizer, {args.prompt_key: row.data[args.prompt_key], args.response_key: r.text},
                              row.source, i, args.prompt_key, args.response_key, eos=r.end_reason == "eos")
                 for (i, row, _), r in zip(batch, results) if r.text.strip()]
    phi_orig = {s["index"]: s["avg_phi"] for s in score_batch(model, [original for _, _, original in batch], pad)}
    phi_new = {s["index"]: s["avg_phi"] for s in score_batch(model, realigned, pad)} if realigned else {}
    outs = []
    for i, d, r in zip(indices, data, results):
        out = dict(d, realigned=r.text, end_reason=r.end_reason, num_tokens=r.n_tokens, mean_lam=r.mean_lam,
                   avg_phi_original=phi_orig[i], avg_phi_realigned=phi_new.get(i))
        if r.analysis is not None:
            out["analysis"] = r.analysis
        if args.answer_key in d:
            out["answer_match"] = answers_match(r.text, d[args.answer_key])
        outs.append((i, out))
    return outs


def main():
    args = parse_args()
    stop = preempt.Stop()  # SIGTERM / SIGUSR1: finish the batch in progress, exit with status 75
    hint_template = load_template(args.hint_template, "hint")
    analysis_template = load_template(args.analysis_template, "analysis") if args.analysis_template else None
    hint = HintConfig(schedule=args.lambda_mode, beta=args.beta, center=args.sigmoid_center,
                      h1=args.piecewise_bounds[0], h2=args.piecewise_bounds[1],
                      splitter=args.splitter or None, analysis=analysis_template is not None)
    folder, arch = load_arch(args.model)
    cli.start(args.tensor_model_parallel_size, 1, arch.num_heads, arch.num_kv_heads, args.distributed_timeout_minutes)
    tokenizer = load_tokenizer(folder)
    out_dir = Path(args.out_dir)
    final = out_dir / "realigned.jsonl"
    # (the filters apply when the rows are merged, so a restart may change them)
    settings = cli.row_settings(args, "min_avg_phi", "require_answer_match", "keep_unfinished")
    job = RowPass("realign_distributed", args.data, out_dir / "shards" / final.name, settings)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, _ = load_model(args.model, state.get_tensor_model_parallel_group(), dtype, cli.device())
    model.eval()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            eos_ids=stop_token_ids(tokenizer, folder), seed=args.seed)
    pad = tokenizer.pad_token_id or 0

    def prepare(i, row):  # the original answer, tokenized as training would
        check_row(row, args)
        return i, row, tokenize_row(tokenizer, row.data, row.source, i, args.prompt_key, args.response_key)

    def process(batch):
        return realign_batch(model, tokenizer, batch, params, hint, hint_template, analysis_template, pad, args)

    job.run(stop, args.window, prepare, batches_of(args.batch_size), process)
    if dist.get_rank() == 0:
        with job.merged(final):
            write_jsonl_atomic(out_dir / "realigned.filtered.jsonl", (r for r in read_jsonl(final) if keep(r, args)))
            summary = summarize(read_jsonl(final), args)
            write_json_atomic(out_dir / "summary.json", summary)
        for key, value in summary.items():
            print(f"{key:>24}: {value}")
        print(f"wrote {final} and {out_dir / 'summary.json'}")


if __name__ == "__main__":
    cli.run(main, "realign_distributed")

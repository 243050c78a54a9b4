#!/usr/bin/env python
"""Accuracy of a model on a question/answer dataset, and how on-policy its own answers are.

    deepspeed --num_gpus N tools/evaluate.py --model MODEL | --load CKPT_DIR --data FILE --out OUT.jsonl \
        --tensor-model-parallel-size T [--prompt-key prompt] [--answer-key answer] [--samples K] \
        [--temperature 0] [--top-p 1] [--max-new-tokens 512]

Each row's question (plain chat prompt, as in training) gets K completions; the final answer of
each (generate/answers.py) is compared with the row's reference answer. Rows are sharded over the
N / T data-parallel groups, each streaming its share --window rows at a time (data/stream.py),
and flushed per row, so a restarted run skips the rows already done. On SIGTERM or SIGUSR1
(launch/slurm/evaluate.sbatch) every group finishes its batch and all exit with status 75.
OUT.jsonl: the row's fields plus `completions`, `extracted`, `correct`, `end_reasons`, `num_tokens`
and `ddt` (the DDT statistics of each completion under the plain prompt; a completion cut by
length or repetition is scored without EOS). OUT.summary.json: pass@1, unbiased pass@k, mean
length, end reasons and the DDT summary of all completions.

--load takes a training run's --save folder: its checkpoint (--tag, default the latest, or on a
restart the one the rows so far were made with) is first exported to OUT.hf/ (kept, so a restart
for the same checkpoint reuses it), on the layout it was saved with. A restart with other settings
than the rows so far were made with is an error."""
import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_onpolicy import cli, preempt  # noqa: E402
from megatron_onpolicy.data import DataError, Sample  # noqa: E402
from megatron_onpolicy.data.stream import add_stream_args  # noqa: E402
from megatron_onpolicy.data.tokenization import on_row  # noqa: E402
from megatron_onpolicy.ddt.score import Summary, length_sorted_batches, score_batch  # noqa: E402
from megatron_onpolicy.generate import SamplingParams, generate, stop_token_ids  # noqa: E402
from megatron_onpolicy.generate.answers import final_answer, normalize, reference_answer  # noqa: E402
from megatron_onpolicy.generate.sampling import batch_generator  # noqa: E402
from megatron_onpolicy.generate.templates import plain_prompt_ids  # noqa: E402
from megatron_onpolicy.model.loader import load_arch, load_model, load_tokenizer  # noqa: E402
from megatron_onpolicy.outputs import (check_no_clash, check_writable, read_jsonl, settings_path,  # noqa: E402
                                       write_json_atomic)
from megatron_onpolicy.parallel import state  # noqa: E402
from megatron_onpolicy.rowpass import RowPass, batches_of  # noqa: E402
from megatron_onpolicy.train.args import TrainConfigError  # noqa: E402


EXPORTED_FROM = "exported_from.json"  # in OUT.hf/: the checkpoint it holds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_args(p)
    p.add_argument("--load", help="a training run's --save folder (instead of --model)")
    p.add_argument("--tag", help="with --load: the checkpoint (default: the latest; on a restart, the rows' own)")
    p.add_argument("--data", required=True, help="JSONL, Parquet or a datasets folder")
    p.add_argument("--out", required=True, help="output JSONL (OUT.summary.json is written beside it)")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--answer-key", default="answer", help="'' = no grading: only completions and DDT")
    p.add_argument("--samples", type=int, default=1, help="completions per row (k)")
    p.add_argument("--temperature", type=cli.finite, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=cli.finite, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="rows per generation batch (each k completions)")
    p.add_argument("--seed", type=int, default=0)
    cli.add_decoding_args(p)
    add_stream_args(p)
    args = p.parse_args(argv)
    cli.check_decoding_args(p, args)
    cli.check_out(p, "--out", args.out, folder=False)
    if args.load and args.model != p.get_default("model"):
        p.error("give --model or --load, not both")
    if args.tag and not args.load:
        p.error("--tag needs --load")
    if args.samples < 1:
        p.error("--samples must be >= 1")
    if args.samples > 1 and args.temperature == 0:
        p.error(f"--samples {args.samples} needs --temperature > 0: greedy completions are all the same")
    return args


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def summarize_eval(rows, samples: int) -> dict:
    """One pass over the rows (streamed from the output file): pass@k where every row is graded,
    mean length, end reasons and the DDT summary of all completions."""
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, samples) if k <= samples})
    n, tokens, graded = 0, 0, True
    passes, ends, ddt = dict.fromkeys(ks, 0.0), Counter(), Summary()
    for r in rows:
        n += 1
        tokens += sum(r["num_tokens"])
        ends.update(r["end_reasons"])
        for d in r["ddt"]:
            ddt.add(d)
        graded = graded and "correct" in r
        if graded:
            for k in ks:
                passes[k] += pass_at_k(samples, sum(r["correct"]), k)
    return {"rows": n, "samples": samples, **({f"pass@{k}": passes[k] / n for k in ks} if graded else {}),
            "mean_num_tokens": tokens / (n * samples), "end_reasons": dict(ends), "ddt": ddt.result()}


OUTPUT_KEYS = ("completions", "extracted", "correct", "end_reasons", "num_tokens", "ddt")


def question_and_answer(row, args):
    for key in filter(None, (args.prompt_key, args.answer_key)):
        if key not in row.data:
            raise DataError(f"{row.source}: field '{key}' missing")
    if not isinstance(row.data[args.prompt_key], str):
        raise DataError(f"{row.source}: field '{args.prompt_key}' must be a string")
    answer = reference_answer(row, args.answer_key) if args.answer_key else None
    check_no_clash(row, OUTPUT_KEYS)
    return row.data[args.prompt_key], answer


def resolve_model(args, out: Path) -> str:
    """The model to evaluate; a checkpoint is exported to OUT.hf/ first (on its own layout), and
    that export is reused only for the same checkpoint. args.tag becomes the tag --load meant
    then (the latest moves on as training goes on); without --tag, a restart keeps the tag its
    rows so far were made with. Rank 0 decides for all: ranks that each read `latest` could pick
    other checkpoints, and some would skip the export while others wait in its collectives."""
    if not args.load:
        return args.model
    from megatron_onpolicy.train.checkpoint import read_checkpoint
    from megatron_onpolicy.train.export import export_checkpoint

    folder = out.with_name(out.name.removesuffix(".jsonl") + ".hf")
    marker, load = folder / EXPORTED_FROM, str(Path(args.load).resolve())

    def decide():  # rank 0: -> (tag, whether OUT.hf/ must be exported)
        tag, settings = args.tag, settings_path(out)
        before = json.loads(settings.read_text()) if tag is None and settings.exists() else {}
        if before.get("load") == args.load:  # as row_settings keeps it: the flag as given
            tag = before["tag"]
            print(f"--load {args.load}: continuing with {tag}, the checkpoint the rows so far were made with",
                  flush=True)
        tag = read_checkpoint(args.load, tag)[0]
        return tag, not (marker.exists() and json.loads(marker.read_text()) == {"load": load, "tag": tag})

    state.init_distributed(args.distributed_timeout_minutes)
    args.tag, export = cli.decided_by_rank_0(decide)
    if export:
        export_checkpoint(args.load, args.tag, folder, timeout_minutes=args.distributed_timeout_minutes)
        if dist.get_rank() == 0:
            write_json_atomic(marker, {"load": load, "tag": args.tag})
    return str(folder)


def score_completions(model, prompt_ids, generations, pad_id):
    """DDT statistics of each completion's own tokens under its plain prompt (a completion cut by
    length or repetition holds no EOS, so none is scored)."""
    samples = [Sample(p + g.tokens, [0] * len(p) + [1] * len(g.tokens), len(p), i)
               for i, (p, g) in enumerate(zip(prompt_ids, generations))]
    stats = {}
    for batch in length_sorted_batches(samples, 16):
        for s in score_batch(model, batch, pad_id):
            stats[s.pop("index")] = s
    return [stats[i] for i in range(len(samples))]


def main():
    args = parse_args()
    stop = preempt.Stop()  # SIGTERM / SIGUSR1: finish the batch in progress, exit with status 75
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = resolve_model(args, out)
    folder, arch = load_arch(name)
    cli.start(args.tensor_model_parallel_size, 1, arch.num_heads, arch.num_kv_heads, args.distributed_timeout_minutes)
    tokenizer = load_tokenizer(folder)
    job = RowPass("evaluate", args.data, out, cli.row_settings(args))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, _ = load_model(name, state.get_tensor_model_parallel_group(), dtype, cli.device())
    model.eval()
    eos = stop_token_ids(tokenizer, folder)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            eos_ids=eos, seed=args.seed)
    pad, k = tokenizer.pad_token_id or 0, args.samples

    def prepare(i, row):  # validates the row
        question, answer = question_and_answer(row, args)
        check_writable(row.data, row.source)  # the output row copies every field
        return i, row, on_row(row.source, args.prompt_key, plain_prompt_ids, tokenizer, question), answer

    def process(batch):
        batch_prompts = [prompt for _, _, prompt, _ in batch for _ in range(k)]
        generator = batch_generator(args.seed, [i for i, *_ in batch], cli.device())
        gens = generate(model, batch_prompts, params, generator, cuda_graph=args.cuda_graph)
        ddt = score_completions(model, batch_prompts, gens, pad)
        for j, (i, source, _, answer) in enumerate(batch):
            mine = gens[j * k:(j + 1) * k]
            texts = [tokenizer.decode(g.tokens[:-1] if g.end_reason == "eos" else g.tokens) for g in mine]
            row = dict(source.data, completions=texts)
            if args.answer_key:
                reference = normalize(answer)
                row["extracted"] = [final_answer(t) for t in texts]
                row["correct"] = [e is not None and normalize(e) == reference for e in row["extracted"]]
            row.update(end_reasons=[g.end_reason for g in mine], num_tokens=[len(g.tokens) for g in mine],
                       ddt=ddt[j * k:(j + 1) * k])
            yield i, row

    job.run(stop, args.window, prepare, batches_of(args.batch_size), process)
    if dist.get_rank() == 0:
        with job.merged(out):
            summary = summarize_eval(read_jsonl(out), k)
            summary_path = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
            write_json_atomic(summary_path, summary)
        for key, value in summary.items():
            print(f"{key:>16}: {value}")
        print(f"wrote {out} and {summary_path}")


if __name__ == "__main__":
    cli.run(main, "evaluate", (TrainConfigError,))

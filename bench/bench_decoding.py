#!/usr/bin/env python
"""Hinted decoding's speed on smollm2-135m, side by side in one process:

  naive   the reference demo's loop, re-implemented: transformers' model, batch 1, no KV cache,
          two full forwards per new token (hinted prompt + tokens so far, plain prompt + tokens so
          far), lam from the hinted entropy, the log-space mixture (DESIGN.md section 2), a draw
  hinted  ours, generate/hinted.py: both streams of B examples as 2B rows of one KV-cached batch
  plain   ours, generate/engine.py: the B plain prompts alone (single-stream generation)

Every row generates exactly --new-tokens tokens (no EOS, repetition guard off), temperature 0.3,
top-p 0.95, prompts and reference answers from data/math_sft.jsonl. tokens/s counts the
tokens kept per example (one per step for hinted: its two streams make one answer). The naive
loop runs --naive-tokens tokens only: without a cache each step costs a forward over the whole
sequence, so its tokens/s at 256 tokens would be lower still than the one measured.

    .venv/bin/python bench/bench_decoding.py [--new-tokens 256] [--naive-tokens 16] [--batches 1 8 32] \
        [--naive-examples 2] [--threads T] [--dtype fp32|bf16] [--cuda-graph]

On a machine with a GPU everything runs there (cli.device()); --cuda-graph times ours a second
time with the decode steps replayed from a CUDA graph, beside the eager runs. Each graphed run
captures its graph (one eager warm-up step and the capture), as every call of generate does, so
its time includes that once-a-batch cost."""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_onpolicy.cli import device  # noqa: E402
from megatron_onpolicy.generate import HintConfig, SamplingParams, generate  # noqa: E402
from megatron_onpolicy.generate.hinted import hinted_generate, lam_schedule  # noqa: E402
from megatron_onpolicy.generate.sampling import sample  # noqa: E402
from megatron_onpolicy.generate.templates import hinted_prompt_ids, load_template, plain_prompt_ids  # noqa: E402
from megatron_onpolicy.model.loader import load_model, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def naive_hinted(hf, hinted, plain, new_tokens, params, hint, generator):
    """The reference loop for one example: no cache, two full forwards per token."""
    out, dev = [], hf.device
    for step in range(new_tokens):
        lh, lp = (hf(torch.tensor([prompt + out], device=dev)).logits[0, -1].float().log_softmax(-1)
                  for prompt in (hinted, plain))
        entropy = -(lh.exp() * lh).sum()
        lam = torch.zeros((), device=dev) if step == 0 else lam_schedule(entropy / math.log(lh.numel()), hint)
        mixed = ((1 - lam) * lh + lam * lp).log_softmax(-1)
        out.append(int(sample(mixed[None], params.temperature, params.top_p, generator=generator)[0]))
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--naive-tokens", type=int, default=16)
    p.add_argument("--naive-examples", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of the weights (both models)")
    p.add_argument("--cuda-graph", action="store_true", help="also ours with the decode steps in a CUDA graph")
    args = p.parse_args()
    if args.cuda_graph and not torch.cuda.is_available():
        p.error("--cuda-graph needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    dtype, dev = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], device()
    model, folder = load_model("smollm2-135m", dtype=dtype, device=dev)
    model.eval()
    tokenizer = load_tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "math_sft.jsonl"))]
    template = load_template(None, "hint")
    hinted = [hinted_prompt_ids(tokenizer, template, r["prompt"], r["response"]) for r in rows]
    plain = [plain_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    params = SamplingParams(temperature=0.3, top_p=0.95, max_new_tokens=args.new_tokens, eos_ids=(),
                            repeat_count=0, seed=0)
    hint = HintConfig()
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}; prompts: hinted "
          f"{sum(map(len, hinted)) / len(hinted):.0f}, plain {sum(map(len, plain)) / len(plain):.0f} tokens on average",
          flush=True)

    graphs = (False, True) if args.cuda_graph else (False,)
    for graph in graphs:  # warm-up
        hinted_generate(model, tokenizer, hinted[:1], plain[:1], SamplingParams(max_new_tokens=4), hint, cuda_graph=graph)
    g = torch.Generator(device=dev).manual_seed(0)
    naive_s = sum(timed(lambda: naive_hinted(hf, hinted[i], plain[i], args.naive_tokens, params, hint, g))[0]
                  for i in range(args.naive_examples))
    naive = args.naive_examples * args.naive_tokens / naive_s
    lines = [f"naive loop, batch 1, {args.naive_tokens} tokens x {args.naive_examples} examples: "
             f"{naive:.2f} tokens/s ({naive_s:.1f} s)"]
    print(lines[-1], flush=True)
    for b in args.batches:
        for graph in graphs:
            h_s, results = timed(lambda: hinted_generate(model, tokenizer, hinted[:b], plain[:b], params, hint,
                                                         cuda_graph=graph))
            p_s, gens = timed(lambda: generate(model, plain[:b], params, cuda_graph=graph))
            assert all(r.n_tokens == args.new_tokens for r in results)
            assert all(len(x.tokens) == args.new_tokens for x in gens)
            h_tps, p_tps = b * args.new_tokens / h_s, b * args.new_tokens / p_s
            lines.append(f"batch {b:>2}{', CUDA graph' if graph else ''}, {args.new_tokens} tokens: hinted "
                         f"{h_tps:7.1f} tokens/s ({h_s:6.1f} s), plain {p_tps:7.1f} tokens/s ({p_s:6.1f} s); "
                         f"hinted / naive {h_tps / naive:6.1f}x, hinted time / plain time {h_s / p_s:.2f}x")
            print(lines[-1], flush=True)
    print("\n".join(["", "summary:"] + lines))


if __name__ == "__main__":
    main()

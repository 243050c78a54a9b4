#!/usr/bin/env python
"""Trainer throughput on smollm2-135m (T = P = 1, one process, fp32), every case a fresh process:

  hf         a plain transformers loop: AutoModelForCausalLM, torch.optim.AdamW, mean CE over the
             loss tokens, clipping at 1.0 (as ours), on the very micro-batches our trainer draws
             (train/batches.py), so model, data and padding are the same
  ours-ce    launch/pretrain_idft.py --loss ce (run in the wrapper process, as `python` runs it), with
             ds_configs/zero0_fp32.json, what one fp32 rank needs (--deepspeed-config: another)
  ours-idft  the same, --loss idft
  ours-ce-unfused   ours-ce with --no-fused-loss (the head's logits built whole): the fused loss's
             share of a step (opt-in)
  ours-pad / ours-pack   --loss idft on variable-length data (responses repeated 1 to 4 times),
             padded micro-batches of --pad-batch rows vs --pack rows of --pack-length tokens
  ours-pack-flex   ours-pack with --attention-backend flex (GPU: one compiled flex_attention call
             a layer instead of an SDPA call per sample)

Tokens are real (not padding) tokens; tokens/s counts the iterations after the first. Also prints
torch.get_num_threads() inside each case. On a machine with a GPU every case runs there.
--profile CASE: cProfile of that case instead.

    .venv/bin/python bench/bench_trainer.py [--rows 24] [--batch 4] [--repeat 3] [--profile ours-ce]
"""
import argparse
import cProfile
import json
import pstats
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENTRY = ROOT / "launch" / "pretrain_idft.py"
CASES = ("hf", "ours-ce", "ours-idft", "ours-pad", "ours-pack", "ours-pack-flex", "ours-ce-unfused")


def trainer_argv(case: str, a, tmp: Path) -> list:
    pack = case.startswith("ours-pack")
    data = tmp / ("var.jsonl" if pack or case == "ours-pad" else "train.jsonl")
    iters = a.pack_iters if pack else a.rows // a.batch
    batch = 1 if pack else a.pad_batch if case == "ours-pad" else a.batch
    return ["--model", "smollm2-135m", "--train-data", str(data), "--seq-length", str(a.pack_length if pack else 2048),
            "--micro-batch-size", str(batch), "--global-batch-size", str(batch), "--train-iters", str(iters),
            "--loss", "ce" if case.startswith("ours-ce") else "idft", "--lr", "1e-5",
            "--tensorboard-dir", str(tmp / case), "--deepspeed_config", a.deepspeed_config,
            *(["--pack"] if pack else []), *(["--attention-backend", "flex"] if case.endswith("-flex") else []),
            *(["--no-fused-loss"] if case.endswith("-unfused") else [])]


def run_ours(case: str, a, tmp: Path) -> dict:
    sys.argv = [str(ENTRY), *trainer_argv(case, a, tmp)]
    runpy.run_path(str(ENTRY), run_name="__main__")
    import torch

    metrics = [json.loads(line) for line in open(tmp / case / "metrics.jsonl")][1:]
    return {"tokens": sum(m["tokens"] for m in metrics),
            "seconds": sum(m["tokens"] / m["tokens_per_s"] for m in metrics), "threads": torch.get_num_threads()}


def run_hf(a, tmp: Path) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers

    from megatron_onpolicy.cli import device
    from megatron_onpolicy.model.loader import load_arch, load_tokenizer
    from megatron_onpolicy.parallel import state
    from megatron_onpolicy.train.args import parse_args
    from megatron_onpolicy.train.batches import TrainBatches, load_parts

    args = parse_args(trainer_argv("ours-ce", a, tmp))
    state.init_distributed()  # the data cache's barrier; a job of one process, 2 threads as ours
    folder, _ = load_arch(args.model)
    parts = load_parts(args.train_data, "--train-data", load_tokenizer(folder), folder, args, False)
    batches = TrainBatches(parts, args, 1, 0, None, 1, a.batch)
    dev = device()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    position, tokens, seconds = batches.start(), 0, 0.0
    for iteration in range(a.rows // a.batch):
        micro, counts, position = batches.next(position)
        t0 = time.perf_counter()
        for (input_ids, _), (targets, mask) in micro:
            input_ids, targets, mask = input_ids.to(dev), targets.to(dev), mask.to(dev)
            logits = model(input_ids=input_ids).logits
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
            ((ce * mask.flatten()).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if dev.type == "cuda":  # as the trainer's timing: until the device is done
            torch.cuda.synchronize()
        if iteration:
            seconds += time.perf_counter() - t0
            tokens += counts["tokens"]
    return {"tokens": tokens, "seconds": seconds, "threads": torch.get_num_threads()}


def write_data(tmp: Path, rows: int) -> None:
    lines = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:rows]))
    # variable length: the bundled rows with their responses repeated 1 to 4 times
    with open(tmp / "var.jsonl", "w") as f:
        for i, line in enumerate(lines):
            row = json.loads(line)
            row["response"] = " ".join([row["response"]] * (1 + i * 5 % 4))
            f.write(json.dumps(row) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pad-batch", type=int, default=2, help="ours-pad: padded rows a batch")
    p.add_argument("--pack-length", type=int, default=1024)
    p.add_argument("--pack-iters", type=int, default=4)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:-2]),
                   help="default: all but ours-pack-flex (the same as ours-pack off CUDA) and ours-ce-unfused")
    p.add_argument("--repeat", type=int, default=1, help="rounds of all cases; the table shows each case's median")
    p.add_argument("--profile", choices=CASES)
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "zero0_fp32.json"), help="ours-* cases")
    p.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)  # the wrapper process of one case
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        tmp = Path(a.tmp)
        work = (lambda: run_hf(a, tmp)) if a.one == "hf" else (lambda: run_ours(a.one, a, tmp))
        if a.profile:
            prof = cProfile.Profile()
            prof.runcall(work)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
            return
        print("RESULT " + json.dumps(work()))
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), a.rows)
        common = ["--tmp", tmp, "--rows", str(a.rows), "--batch", str(a.batch), "--pad-batch", str(a.pad_batch),
                  "--pack-length", str(a.pack_length), "--pack-iters", str(a.pack_iters),
                  "--deepspeed-config", a.deepspeed_config]
        if a.profile:
            subprocess.run([sys.executable, __file__, "--one", a.profile, "--profile", a.profile, *common], cwd=ROOT)
            return
        rates, threads, failed = {case: [] for case in a.cases}, {}, set()
        for round_ in range(a.repeat):  # the cases in turn, so that a slow spell hits one round of each
            for case in a.cases:
                if case in failed:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", case, *common], cwd=ROOT,
                                     capture_output=True, text=True)
                lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not lines:  # reported; the other cases still run (a GPU call is short)
                    print(f"{case} failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}", file=sys.stderr, flush=True)
                    failed.add(case)
                    continue
                r = json.loads(lines[-1][7:])
                rates[case].append(r["tokens"] / r["seconds"])
                threads[case] = r["threads"]
                print(f"round {round_ + 1} {case}: {rates[case][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
        median = {case: statistics.median(v) for case, v in rates.items() if case not in failed}
        hf = median.get("hf", float("nan"))
        print("| case | tokens/s (median) | x hf | rounds | threads |")
        print("|---|---|---|---|---|")
        for case, rate in median.items():
            print(f"| {case} | {rate:.1f} | {rate / hf:.2f} | {' / '.join(f'{x:.1f}' for x in rates[case])} "
                  f"| {threads[case]} |")
        for case in failed:
            print(f"| {case} | failed (stderr) | | | |")
        if failed:
            sys.exit(1)


if __name__ == "__main__":
    main()

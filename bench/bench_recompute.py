#!/usr/bin/env python
"""Activation recomputation in the trainer: peak memory and time per iteration of
`launch/pretrain_idft.py` on smollm2-135m without recomputation, selective and full
(uniform, one layer a group), at T = 1 (one process) and T = 3 (three, torchrun).

Rows of --seq-length tokens (responses tiled past it, truncated), micro-batch 1, fp32, ZeRO-1,
the fused loss (so the logits do not dominate). Each case runs in a fresh wrapper process whose
children's peak RSS is the largest rank's peak RSS; on a GPU the peak is metrics.jsonl's
mem_peak_gb (torch.cuda.max_memory_allocated) instead, and T is at most the GPUs there are. The
time is the best of the iterations after the first (metrics.jsonl: tokens / tokens_per_s).

    .venv/bin/python bench/bench_recompute.py [--seq-length 2048] [--tp 1 3] [--iters 2]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "launch" / "pretrain_idft.py"
CASES = {"none": (), "selective": ("--recompute-activations",), "full": ("--recompute-granularity", "full")}


def long_rows(path: Path, seq_length: int, n: int) -> None:
    """n rows whose responses (the bundled ones, tiled) run past seq_length tokens."""
    rows = [json.loads(line) for line in (ROOT / "data" / "math_sft.jsonl").read_text().splitlines()]
    text = " ".join(r["response"] for r in rows)
    times = seq_length // (len(text) // 4) + 2  # > 1 token per 4 characters
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": rows[i]["prompt"], "response": " ".join([text] * times)}) + "\n")


def run_case(case: str, tp: int, seq_length: int, iters: int, data: Path, out: Path) -> dict:
    cmd = [sys.executable, str(ENTRY)] if tp == 1 else \
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={tp}", str(ENTRY)]
    cmd += ["--model", "smollm2-135m", "--train-data", str(data), "--seq-length", str(seq_length),
            "--tensor-model-parallel-size", str(tp), "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", str(iters), "--loss", "idft", "--tensorboard-dir", str(out),  # metrics, no checkpoint
            "--deepspeed_config", str(ROOT / "ds_configs" / "zero1_fp32.json"), *CASES[case]]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{case} T={tp} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    seconds = min(m["tokens"] / m["tokens_per_s"] for m in metrics[1:] or metrics)
    peak_gb = max(m["mem_peak_gb"] for m in metrics) if "mem_peak_gb" in metrics[0] else \
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KB -> GB; the largest rank
    return {"case": case, "tp": tp, "seconds": seconds, "peak_gb": peak_gb, "tokens": metrics[-1]["tokens"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("CASE", "TP"), help=argparse.SUPPRESS)  # the wrapper
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        tmp = Path(a.tmp)
        print(json.dumps(run_case(a.one[0], int(a.one[1]), a.seq_length, a.iters, tmp / "train.jsonl",
                                  tmp / f"{a.one[0]}-tp{a.one[1]}")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        long_rows(Path(tmp) / "train.jsonl", a.seq_length, a.iters)
        import torch

        gpu = torch.cuda.is_available()
        where = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()} cores"
        print(f"smollm2-135m, {a.seq_length} tokens a micro-batch, fp32, {where}")
        print(f"| T | recompute | s / iteration | x none | peak {'GPU memory' if gpu else 'RSS'} GB (largest rank) | x none |")
        print("|---|---|---|---|---|---|")
        for tp in a.tp:
            base = None
            for case in CASES:
                out = subprocess.run([sys.executable, __file__, "--one", case, str(tp), "--tmp", tmp,
                                      "--seq-length", str(a.seq_length), "--iters", str(a.iters)],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stdout + out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                base = base or r
                print(f"| {tp} | {case} | {r['seconds']:.1f} | {r['seconds'] / base['seconds']:.2f} | "
                      f"{r['peak_gb']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""One decode step where its cost is dispatching ops, not arithmetic: the tests' tiny Llama with 30
layers of width 64 (vocab 49152), 8 left-padded prompts, fp32, one thread, on the CPU. A decode
step on a GPU is bound the same way (each op about one kernel launch, docs/performance.md), so the
ops a step dispatches are the figure to cut. Prints the aten ops of one step (a dispatch mode
counts them) and the mean step time over --steps steps; --trees runs other checkouts too, each
case a fresh process, the rounds interleaved, and prints the medians and their ratios.

    .venv/bin/python bench/bench_decode_step.py [--trees DIR ...] [--repeat 3]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(tree, model_dir, steps):
    """`ops time_ms` of one step of `tree`'s DecodeState, in this (fresh) process."""
    sys.path.insert(0, tree)
    import torch
    from cases import OpCount  # bench/cases.py

    from megatron_onpolicy.generate.engine import DecodeState
    from megatron_onpolicy.model.loader import load_model

    torch.set_num_threads(1)
    model, _ = load_model(model_dir)
    prompts = [[5 + i + j for j in range(20 + 3 * i)] for i in range(8)]
    tok = torch.full((8,), 7)
    with torch.no_grad():
        state = DecodeState(model, prompts, steps + 10)
        state.prefill()
        for _ in range(5):
            state.step(tok)
        with OpCount() as count:
            state.step(tok)
        start = time.perf_counter()
        for _ in range(steps):
            state.step(tok)
    print(sum(count.n.values()), (time.perf_counter() - start) / steps * 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="*", default=[], help="other checkouts to run side by side")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # TREE MODEL_DIR: one case
    args = p.parse_args()
    if args.one:
        return one(*args.one, args.steps)
    sys.path.insert(0, ROOT)
    from tests.train_utils import make_tiny_model

    trees = [ROOT] + [os.path.abspath(t) for t in args.trees]
    results = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(tmp, layers=30)
        for _ in range(args.repeat):
            for tree in trees:
                out = subprocess.run([sys.executable, __file__, "--one", tree, tmp, "--steps", str(args.steps)],
                                     capture_output=True, text=True, check=True)
                ops, ms = out.stdout.split()[-2:]
                results[tree].append((int(ops), float(ms)))
    base = statistics.median(ms for _, ms in results[ROOT])
    print("| tree | aten ops a step | ms a step (rounds) | median | x this tree |")
    print("|---|---|---|---|---|")
    for tree, runs in results.items():
        med = statistics.median(ms for _, ms in runs)
        print(f"| {tree} | {runs[0][0]} | {' / '.join(f'{ms:.2f}' for _, ms in runs)} | {med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()

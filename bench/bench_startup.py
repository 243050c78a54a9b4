#!/usr/bin/env python
"""Where the trainer's start-up goes: one rank of launch/pretrain_idft.py (the tests' tiny random
Llama with the SmolLM2 tokenizer, an indexed dataset, one iteration), each phase's wall and CPU
seconds, from process start to the end of the first iteration. Every repetition is a fresh
process; the medians are printed. CPU seconds (the process's, all threads) are what a busy
machine distorts least.

    .venv/bin/python bench/bench_startup.py [--reps 5] [--rows 2000] [--work /tmp/bench_startup] [TRAINER ARGS]

Other arguments go to the trainer (e.g. --fused-loss-kernel eager).

The phases are the trainer's own functions, timed by wrapping them in the child process
(`--child`), which then runs the entry point as `python launch/pretrain_idft.py` would."""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = (  # (module, function): the set-up steps of train/loop.py, in order
    ("megatron_onpolicy.train.loop", "load_arch"), ("megatron_onpolicy.cli", "start"),
    ("megatron_onpolicy.train.loop", "load_tokenizer"), ("megatron_onpolicy.train.loop", "load_parts"),
    ("megatron_onpolicy.train.loop", "build_pipeline"), ("megatron_onpolicy.train.loop", "load_hf_weights"),
    ("megatron_onpolicy.train.loop", "make_engine"), ("deepspeed.runtime.engine", "is_zero_supported_optimizer"),
    ("megatron_onpolicy.train.loop", "train_step"))


def child(out: Path, spawned: float, argv: list) -> None:
    # The parent's clock just before it spawned this process: psutil's create_time counts from the
    # boot time, which Linux gives in whole seconds, and read up to 0.9 s early here.
    start_wall = spawned
    clock = lambda: (time.time(), time.process_time())
    t0 = clock()
    sys.path.insert(0, str(ROOT))
    import importlib
    import megatron_onpolicy.train.loop  # noqa: F401 (torch, deepspeed, transformers and ours)
    import launch.pretrain_idft  # noqa: F401
    t1 = clock()
    record = {"interpreter start": (t0[0] - start_wall, t0[1]), "imports": (t1[0] - t0[0], t1[1] - t0[1])}

    def timed(name, fn):
        def wrapper(*a, **k):
            if name in record:  # the first call only (train_step: the first iteration)
                return fn(*a, **k)
            b = clock()
            try:
                return fn(*a, **k)
            finally:
                e = clock()
                record[name] = (e[0] - b[0], e[1] - b[1])
                if name == "train_step":
                    record["total"] = (e[0] - start_wall, e[1])
                    out.write_text(json.dumps(record))
        return wrapper

    for module, name in PHASES:
        m = importlib.import_module(module)
        fn = getattr(m, name)
        setattr(m, name, timed(name, fn))
    import runpy
    sys.argv = [str(ROOT / "launch" / "pretrain_idft.py")] + argv
    runpy.run_path(sys.argv[0], run_name="__main__")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_startup"))
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(args.child, args.spawned, rest)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_data import generate
    from megatron_onpolicy.data.preprocess import Settings, preprocess
    from tests.train_utils import make_tiny_model
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    if not (w / "tiny").is_dir():
        make_tiny_model(w / "tiny")
    if not (w / "data.idx").is_file():
        generate(w / "rows.jsonl", args.rows)
        preprocess(w / "rows.jsonl", w / "data", w / "tiny", Settings(), 1, progress=False)
    train = ["--model", str(w / "tiny"), "--train-data", str(w / "data"), "--seq-length", "512",
             "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "0", "--loss", "ce",
             "--deepspeed_config", str(ROOT / "ds_configs" / "zero1_fp32.json")]
    runs = []
    for rep in range(args.reps + 1):  # the first run warms the page cache and is not counted
        out, save = w / "phases.json", w / "run"
        out.unlink(missing_ok=True)
        shutil.rmtree(save, ignore_errors=True)  # a complete checkpoint there would be resumed, not trained
        result = subprocess.run([sys.executable, __file__, "--child", str(out), "--spawned", repr(time.time()),
                                 *train, *rest, "--save", str(save)],
                                cwd=ROOT, capture_output=True, text=True)
        if not out.is_file():
            raise RuntimeError(f"the run failed:\n{result.stderr[-3000:]}")
        if rep:
            runs.append(json.loads(out.read_text()))
    print(f"{'phase':<28} {'wall s':>7} {'cpu s':>6}   (medians of {args.reps} fresh processes)")
    for name in runs[0]:
        cells = [statistics.median(r[name][k] if name in r else 0.0 for r in runs) for k in (0, 1)]
        print(f"{name:<28} {cells[0]:7.2f} {cells[1]:6.2f}")
    print("is_zero_supported_optimizer: inside make_engine (DeepSpeed's ZeRO optimizer check); train_step: the "
          "first iteration; total: process start to its end")

if __name__ == "__main__":
    main()

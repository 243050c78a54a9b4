#!/usr/bin/env python
"""The ops a training iteration dispatches, by phase, for each DeepSpeed config: where a small
model's step on a GPU is bound by the host launching kernels, each aten op is about one launch,
and a host sync (`.item()`, `nonzero`) stalls the host until the GPU has caught up. So these
counts say what a config adds to a step whatever the device. One fresh process a config
(launch/pretrain_idft.py, T = P = 1), the second iteration counted (a dispatch mode), one
micro-batch of 2 bundled rows; also the host seconds of each phase on this machine.

    .venv/bin/python bench/bench_step_ops.py [--configs zero0_fp32 zero1_fp32 zero1_bf16] [--model M]
"""
import argparse
import contextlib
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENTRY = ROOT / "launch" / "pretrain_idft.py"
SYNCS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default")
PHASES = ("forward", "backward", "step")


def count_one(config: str, model: str, tmp: str) -> dict:
    """Run the trainer here, counting the second iteration's ops by phase."""
    from cases import OpCount  # bench/cases.py

    import megatron_onpolicy.train.loop as loop
    from megatron_onpolicy.train.engine import _to

    phases = {phase: {"ops": 0, "syncs": 0, "s": 0.0} for phase in PHASES}

    @contextlib.contextmanager
    def counting(phase):
        mode, t0 = OpCount(), time.perf_counter()
        with mode:
            yield
        phases[phase]["ops"] += sum(mode.n.values())
        phases[phase]["syncs"] += sum(mode.n[s] for s in SYNCS)
        phases[phase]["s"] += time.perf_counter() - t0

    calls, step = [0], loop.train_step

    def counted(engine, micro_batches):  # train_step's P = 1 path, its second call counted
        calls[0] += 1
        if calls[0] != 2:
            return step(engine, micro_batches)
        engine.train()
        for inputs, labels in micro_batches:
            with counting("forward"):
                loss = engine(_to(inputs, engine.device), _to(labels, engine.device))
            with counting("backward"):
                engine.backward(loss)
            with counting("step"):
                engine.step()

    loop.train_step = counted
    sys.argv = [str(ENTRY), "--model", model, "--train-data", str(ROOT / "data" / "math_sft.jsonl"),
                "--seq-length", "512", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                "--loss", "ce", "--lr", "1e-5", "--tensorboard-dir", tmp,
                "--deepspeed_config", str(ROOT / "ds_configs" / f"{config}.json")]
    runpy.run_path(str(ENTRY), run_name="__main__")
    return phases


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["zero0_fp32", "zero1_fp32", "zero1_bf16"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(count_one(a.one, a.model, tmp)))
        return
    from cases import case_in_subprocess  # bench/cases.py

    print("| config | forward ops | backward ops | step ops | host syncs | forward / backward / step host s |")
    print("|---|---|---|---|---|---|")
    for config in a.configs:
        r = case_in_subprocess(__file__, config, ["--one", config, "--model", a.model])
        if r is not None:
            print(f"| {config} | " + " | ".join(str(r[x]["ops"]) for x in PHASES)
                  + f" | {sum(x['syncs'] for x in r.values())} | "
                  + " / ".join(f"{r[x]['s']:.2f}" for x in PHASES) + " |", flush=True)


if __name__ == "__main__":
    main()

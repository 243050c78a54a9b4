#!/usr/bin/env python
"""The data path at scale, side by side in one run, on a generated set of ~200-token rows:

- tools/preprocess_data.py's throughput (rows/s) at 1 and 2 workers, on OLD_BIG rows;
- the trainer's start-up (process start -> first iteration recorded) and peak RSS of its one rank
  on an indexed dataset of SMALL and BIG rows, and the same for the raw-file path of the code
  before indexed datasets (`--old-commit`, taken with `git archive`) at SMALL and OLD_BIG rows.

The BIG dataset is the OLD_BIG one's tokenized chunks written BIG/OLD_BIG times through the
preprocessor's own writer (tokenizing 1 M rows takes most of an hour on 2 shared cores; the
writer, the index and everything the trainer reads are the real thing). The model is the tests'
tiny random Llama with the SmolLM2 tokenizer, so start-up is dominated by the data path.

    .venv/bin/python bench/bench_data.py [--small 10000] [--big 1000000] [--old-big 100000] \
        [--old-commit 5a15237] [--work /tmp/bench_data]"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_onpolicy.data.indexed import IndexedDataset, paths  # noqa: E402
from megatron_onpolicy.data.preprocess import Settings, _Writer, preprocess  # noqa: E402
from megatron_onpolicy.outputs import write_json_atomic  # noqa: E402
from tests.train_utils import make_tiny_model  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has "
         "had one two three apple train river number answer total each more less than step then so we add "
         "subtract multiply divide left right price cost miles hours days weeks friends books marbles").split()


def generate(path: Path, n: int) -> None:
    """n prompt/response rows of about 50 + 150 tokens (seeded)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(WORDS, k=40)) + f" {i}?"
            response = " ".join(rng.choices(WORDS, k=130)) + f" The answer is {rng.randrange(1000)}."
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def tile(src: str, big: str, times: int) -> None:
    """BIG = SRC's samples `times` times over, through the preprocessor's writer."""
    ds = IndexedDataset(src)
    tmp = Path(big + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _Writer(tmp, ds.dtype, Settings(**{k: ds.meta[k] for k in Settings.__dataclass_fields__}))
    records = ds.bin.tobytes()
    sizes = np.diff(np.append(ds.offsets, len(ds.bin)))
    for k in range(times):
        writer.add({"rows": ds.meta["source"]["rows"], "records": records, "sizes": sizes,
                    "lengths": np.array(ds.lengths), "prompt_lens": np.array(ds.prompt_lens),
                    "row_ids": ds.rows + k * ds.meta["source"]["rows"], "truncated": 0})
    crc = writer.finish(tmp / "idx")
    bin_path, idx_path, json_path = paths(big)
    os.replace(tmp / "bin", bin_path)
    os.replace(tmp / "idx", idx_path)
    meta = {**ds.meta, "source": {"path": f"{ds.meta['source']['path']} x {times}", "rows": writer.rows},
            "samples": writer.samples, "tokens": writer.tokens, "idx_crc32": crc}
    write_json_atomic(json_path, meta)
    shutil.rmtree(tmp)


def startup(root: Path, model: Path, data: str, out: Path) -> tuple[float, float]:
    """(seconds from process start to the first metrics record, peak RSS in MiB) of a one-rank run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(root / "launch" / "pretrain_idft.py"), "--model", str(model), "--train-data", data,
           "--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
           "--lr", "0", "--loss", "ce", "--save", str(out),
           "--deepspeed_config", str(root / "ds_configs" / "zero1_fp32.json")]
    start, first, peak = time.perf_counter(), None, 0
    with open(out.parent / "run.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            # VmHWM: the peak resident set of the trainer process itself (not of compilers it may run)
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1])
            except (OSError, StopIteration):
                pass
            if first is None and (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
                first = time.perf_counter() - start
            time.sleep(0.05)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{cmd}: exit {proc.returncode}\n{log.read()[-3000:]}")
    return first or time.perf_counter() - start, peak / 1024


def data_startup(prefix: Path, tokenizer) -> float:
    """Seconds to open an indexed dataset as the trainer does (checks, --seq-length, the epoch's
    order) and build one rank's first batch: the data path's share of the start-up."""
    from types import SimpleNamespace

    from megatron_onpolicy.train.batches import TrainBatches, load_parts
    args = SimpleNamespace(seq_length=512, overlong="truncate", pack=False, seed=1234, train_iters=1, epochs=None)
    t0 = time.perf_counter()
    parts = load_parts([str(prefix)], "--train-data", tokenizer, None, args, False)
    batches = TrainBatches(parts, args, 1, 0, None, 1, 8)
    batches.next(batches.start())
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--big", type=int, default=1_000_000)
    p.add_argument("--old-big", type=int, default=100_000)
    p.add_argument("--old-commit", default="5a15237", help="the code before indexed datasets")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_data"))
    args = p.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    os.environ["MEGATRON_ONPOLICY_DATA_CACHE"] = str(w / "cache")
    model = w / "tiny"
    if not model.is_dir():
        make_tiny_model(model)
    old = w / "old-code"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    subprocess.run(f"git -C {ROOT} archive {args.old_commit} | tar -x -C {old}", shell=True, check=True)
    for n in (args.small, args.old_big):
        if not (w / f"rows{n}.jsonl").is_file():
            generate(w / f"rows{n}.jsonl", n)

    results = []
    for workers in (1, 2):  # throughput on the OLD_BIG file, so that the pool's start-up is amortized
        t0 = time.perf_counter()
        meta = preprocess(w / f"rows{args.old_big}.jsonl", w / f"mid-w{workers}", model, Settings(), workers,
                          progress=False)
        seconds = time.perf_counter() - t0
        results.append(f"preprocess {args.old_big} rows ({meta['tokens'] / args.old_big:.0f} tokens/row), "
                       f"{workers} worker(s): {args.old_big / seconds:.0f} rows/s ({seconds:.1f} s)")
        print(results[-1], flush=True)
    assert all(paths(w / "mid-w1")[i].read_bytes() == paths(w / "mid-w2")[i].read_bytes() for i in range(3))
    preprocess(w / f"rows{args.small}.jsonl", w / "small", model, Settings(), 1, progress=False)
    t0 = time.perf_counter()
    tile(str(w / "mid-w1"), str(w / "big"), args.big // args.old_big)
    print(f"(BIG written by tiling in {time.perf_counter() - t0:.1f} s; .idx "
          f"{paths(w / 'big')[1].stat().st_size / 2**20:.1f} MiB, .bin {paths(w / 'big')[0].stat().st_size / 2**20:.0f}"
          f" MiB)", flush=True)

    from megatron_onpolicy.model.loader import load_tokenizer
    tokenizer = load_tokenizer(model)
    for n, prefix in ((args.small, w / "small"), (args.big, w / "big")):
        results.append(f"data path alone (open, checks, order, first batch of 8), indexed, {n} rows: "
                       f"{data_startup(prefix, tokenizer) * 1000:.0f} ms")
        print(results[-1], flush=True)
    startup(ROOT, model, str(w / "small"), w / "run")  # warm-up: page cache, JIT-built extensions
    for label, root, data in (
            (f"indexed, {args.small} rows", ROOT, w / "small"),
            (f"indexed, {args.big} rows", ROOT, w / "big"),
            (f"old raw-file path, {args.small} rows", old, w / f"rows{args.small}.jsonl"),
            (f"old raw-file path, {args.old_big} rows", old, w / f"rows{args.old_big}.jsonl")):
        seconds, rss = startup(root, model, str(data), w / "run")
        results.append(f"start-up to the first step, {label}: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
        print(results[-1], flush=True)
    print("\n".join(["", "summary:"] + results))


if __name__ == "__main__":
    main()

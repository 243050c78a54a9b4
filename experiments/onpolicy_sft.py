#!/usr/bin/env python
"""Does on-policy SFT generalize better here? Six training arms on smollm2-135m, one budget.

    nohup python experiments/onpolicy_sft.py > runs/onpolicy_sft.log 2>&1 &      # the full table
    python experiments/onpolicy_sft.py --smoke                                   # minutes, end to end
    python experiments/onpolicy_sft.py --table docs/results.md                   # fill the table

Arms, all with the same steps, batch and learning rate on the same training problems:
ce / dft / eaft / idft on the original (textbook-style) solutions, and ce / idft on the solutions
rewritten by the model itself with hinted decoding (tools/realign_distributed.py). Each trained
model and the untrained one are evaluated (tools/evaluate.py, greedy) on the held-out in-domain
split and the out-of-domain split, and for retention: the mean NLL, under the model, of the
untrained model's own answers to general prompts (tools/ddt_score.py): how much it forgot.

Every step writes its output atomically and is skipped when the output is there, so the script
can be stopped at any point and started again with the same arguments. Work files go to
--work-dir; one JSON per (arm, seed) and one for the untrained model go to --results-dir."""
import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_onpolicy.outputs import write_json_atomic, write_jsonl_atomic, write_text_atomic  # noqa: E402

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ARMS = {  # name: (loss, training solutions)
    "ce": ("ce", "original"), "dft": ("dft", "original"), "eaft": ("eaft", "original"),
    "idft": ("idft", "original"), "ce-realigned": ("ce", "realigned"), "idft-realigned": ("idft", "realigned")}
SMOKE_ARMS = ["ce", "idft", "ce-realigned"]
METRICS = [("test_pass@1", "in-domain pass@1"), ("ood_pass@1", "OOD pass@1"),
           ("retention_nll", "retention NLL"), ("test_mean_z", "in-domain DDT z of own answers")]
TABLE_BEGIN, TABLE_END = "<!-- results table: begin -->", "<!-- results table: end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (smoke: ce idft ce-realigned)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 (smoke: 1)")
    p.add_argument("--train-iters", type=int, help="default 40 (smoke: 2)")
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seq-length", type=int, default=320)
    p.add_argument("--train-rows", type=int, help="training problems (default 192; smoke 4)")
    p.add_argument("--eval-rows", type=int, help="rows of each evaluation split (default 64; smoke 4)")
    p.add_argument("--max-new-tokens", type=int, help="evaluation and realignment (default 256; smoke 32)")
    p.add_argument("--nproc", type=int, default=2, help="processes per step (data parallel)")
    p.add_argument("--deepspeed-config", default=str(ROOT / "ds_configs" / "zero1_fp32.json"))
    p.add_argument("--smoke", action="store_true", help="a tiny budget, to check the pipeline end to end")
    p.add_argument("--work-dir", type=Path, help="default runs/onpolicy_sft (smoke: runs/onpolicy_sft_smoke)")
    p.add_argument("--results-dir", type=Path, help="default experiments/results (smoke: WORK_DIR/results)")
    p.add_argument("--table", type=Path, metavar="MARKDOWN", help="only fill the table in this file from --results-dir")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = dict(arms=SMOKE_ARMS if smoke else list(ARMS), seeds=[1] if smoke else [1, 2],
                    train_iters=2 if smoke else 40, train_rows=4 if smoke else 192,
                    eval_rows=4 if smoke else 64, max_new_tokens=32 if smoke else 256,
                    work_dir=ROOT / "runs" / ("onpolicy_sft_smoke" if smoke else "onpolicy_sft"))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results_dir is None:
        args.results_dir = args.work_dir / "results" if smoke else ROOT / "experiments" / "results"
    return args


class Steps:
    """Runs each step once: a step whose output exists is skipped; logs go to WORK/logs/."""

    def __init__(self, work: Path):
        self.work = work
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, done: Path, cmd: list[str]) -> float:
        """Run `cmd` unless `done` exists; returns the wall seconds it took (0 when skipped)."""
        if done.exists():
            print(f"[skip] {name}", flush=True)
            return 0.0
        log = self.work / "logs" / f"{name}.log"
        print(f"[run ] {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        with open(log, "w") as f:
            code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if code != 0 or not done.exists():
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"step {name} failed (exit {code}); log {log}:\n{tail}")
        return time.time() - start


def launcher(nproc: int) -> list[str]:
    # A free port each time: the launcher's default 29500 may be held by another job on the node.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port)]


def head(src: Path, n: int, out: Path) -> Path:
    if not out.exists():
        write_text_atomic(out, "".join(src.read_text().splitlines(keepends=True)[:n]))
    return out


def evaluate(steps, args, name, model, data, out, answer_key="answer") -> dict:
    summary = out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
    steps.run(name, summary, launcher(args.nproc) + [
        "tools/evaluate.py", "--model", str(model), "--data", str(data), "--out", str(out),
        "--max-new-tokens", str(args.max_new_tokens), "--answer-key", answer_key])
    return json.loads(summary.read_text())


def retention_nll(steps, args, name, model, data, out) -> float:
    """Token-weighted mean NLL of the reference answers under `model`."""
    steps.run(name, out, launcher(args.nproc) + [
        "tools/ddt_score.py", "--model", str(model), "--data", str(data), "--out", str(out)])
    rows = [json.loads(line) for line in open(out)]
    return -sum(r["avg_logp"] * r["num_tokens"] for r in rows) / sum(r["num_tokens"] for r in rows)


def prepare(steps, args) -> dict:
    """The splits, the retention answers of the untrained model, and the realigned training set."""
    work, data = args.work_dir, args.work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    splits = {"train": head(ROOT / "data" / "math_train.jsonl", args.train_rows, data / "train.jsonl"),
              "test": head(ROOT / "data" / "math_test.jsonl", args.eval_rows, data / "test.jsonl"),
              "ood": head(ROOT / "data" / "math_ood.jsonl", args.eval_rows, data / "ood.jsonl"),
              "general": head(ROOT / "data" / "general_prompts.jsonl", 4 if args.smoke else 24, data / "general.jsonl")}
    own = evaluate(steps, args, "base-general", args.model, splits["general"], work / "base" / "general.jsonl", "")
    retention = data / "retention.jsonl"
    if not retention.exists():  # the untrained model's answers that it ended itself (cut ones would need no EOS)
        rows = [json.loads(line) for line in open(work / "base" / "general.jsonl")]
        kept = [{"prompt": r["prompt"], "response": c} for r in rows
                for c, e in zip(r["completions"], r["end_reasons"]) if e == "eos" and c.strip()]
        if not kept:  # a smoke budget cuts every answer: keep them all rather than have no check
            kept = [{"prompt": r["prompt"], "response": r["completions"][0]} for r in rows]
        write_jsonl_atomic(retention, kept)
    print(f"retention set: {sum(1 for _ in open(retention))} answers; own answers {own['end_reasons']}", flush=True)
    realigned = work / "realigned"
    steps.run("realign", realigned / "summary.json", launcher(args.nproc) + [
        "tools/realign_distributed.py", "--model", args.model, "--data", str(splits["train"]),
        "--out-dir", str(realigned), "--max-new-tokens", str(args.max_new_tokens)]
        + (["--keep-unfinished"] if args.smoke else []))
    splits["realigned"] = realigned / "realigned.filtered.jsonl"
    if not any(True for _ in open(splits["realigned"])):
        raise SystemExit(f"{splits['realigned']}: no realigned row ended by itself; raise --max-new-tokens")
    splits["retention"] = retention
    return splits


def model_metrics(steps, args, tag, model, splits) -> dict:
    folder = args.work_dir / tag
    test = evaluate(steps, args, f"{tag}-test", model, splits["test"], folder / "test.jsonl")
    ood = evaluate(steps, args, f"{tag}-ood", model, splits["ood"], folder / "ood.jsonl")
    return {"test_pass@1": test["pass@1"], "ood_pass@1": ood["pass@1"],
            "retention_nll": retention_nll(steps, args, f"{tag}-retention", model, splits["retention"],
                                           folder / "retention.jsonl"),
            "test_mean_z": test["ddt"]["mean_z"], "test_mean_num_tokens": test["mean_num_tokens"],
            "ood_mean_num_tokens": ood["mean_num_tokens"], "test_end_reasons": test["end_reasons"],
            "ood_end_reasons": ood["end_reasons"]}


def train(steps, args, arm, seed, splits) -> tuple[Path, float]:
    loss, solutions = ARMS[arm]
    hf = args.work_dir / f"{arm}-seed{seed}" / "hf"
    seconds = steps.run(f"{arm}-seed{seed}-train", hf / "config.json", launcher(args.nproc) + [
        "launch/pretrain_idft.py", "--model", args.model,
        "--train-data", str(splits["train" if solutions == "original" else "realigned"]),
        "--response-key", "realigned" if solutions == "realigned" else "response", "--loss", loss,
        "--train-iters", str(args.train_iters), "--global-batch-size", str(args.global_batch_size),
        "--micro-batch-size", str(args.micro_batch_size), "--lr", str(args.lr), "--seq-length", str(args.seq_length),
        "--seed", str(seed), "--export-hf", str(hf), "--tensorboard-dir", str(hf.parent / "tensorboard"),
        "--deepspeed_config", args.deepspeed_config])  # metrics.jsonl goes beside TensorBoard's files
    return hf, seconds


def run_all(args) -> None:
    steps = Steps(args.work_dir)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    splits = prepare(steps, args)
    budget = {k: getattr(args, k) for k in ("model", "train_iters", "global_batch_size", "micro_batch_size", "lr",
                                            "seq_length", "train_rows", "eval_rows", "max_new_tokens", "nproc")}
    base = args.results_dir / "base.json"
    if not base.exists():
        write_json_atomic(base, {"arm": "untrained", "seed": None, "budget": budget,
                                 **model_metrics(steps, args, "base", args.model, splits)})
    for seed in args.seeds:
        for arm in args.arms:
            out = args.results_dir / f"{arm}-seed{seed}.json"
            if out.exists():
                continue
            hf, seconds = train(steps, args, arm, seed, splits)
            metrics = model_metrics(steps, args, f"{arm}-seed{seed}", hf, splits)
            write_json_atomic(out, {"arm": arm, "seed": seed, "loss": ARMS[arm][0], "solutions": ARMS[arm][1],
                                    "budget": budget, "train_seconds": round(seconds, 1), **metrics})
            print(f"{arm} seed {seed}: {json.dumps(metrics)}", flush=True)
    print(f"done in {time.time() - start:.0f} s; results in {args.results_dir}", flush=True)


def table(results_dir: Path) -> str:
    """Markdown: one line per arm, mean ± sample standard deviation over seeds (n seeds)."""
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    order = ["untrained"] + list(ARMS)
    lines = ["| arm | seeds | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for arm in order:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        cells = []
        for key, _ in METRICS:
            values = [r[key] for r in mine]
            mean = sum(values) / len(values)
            spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
            cells.append(f"{mean:.3f}" + (f" ± {spread:.3f}" if spread is not None else ""))
        lines.append(f"| {arm} | {len(mine) if arm != 'untrained' else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fill_table(markdown: Path, results_dir: Path) -> None:
    text = markdown.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{markdown}: no '{TABLE_BEGIN}' ... '{TABLE_END}' block to fill")
    before, rest = text.split(TABLE_BEGIN, 1)
    _, after = rest.split(TABLE_END, 1)
    write_text_atomic(markdown, f"{before}{TABLE_BEGIN}\n{table(results_dir)}{TABLE_END}{after}")
    print(f"filled the table in {markdown} from {results_dir}")


if __name__ == "__main__":
    args = parse_args()
    if args.table:
        fill_table(args.table, args.results_dir)
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run_all(args)

"""launch/slurm/*.sbatch on a real one-node SLURM (tests/slurm_cluster.py), as users submit them:

(a) a 2-task training job warned with `scancel --signal=USR1 --batch` (what `--signal=B:USR1@N`
    does before a time limit) saves, exits 75, requeues itself, and the requeued job continues
    from its checkpoint to the same per-iteration losses as an uninterrupted torchrun run (which
    also shows srun and torchrun start the same job with the same iteration-1 loss);
(b) a 2-task realignment job cancelled mid-run (`scancel`: SIGTERM to every task) and resubmitted
    with 1 task writes every row exactly once, equal to an uninterrupted run's;
(c) a 2-task evaluation job warned with USR1 stops after its batch, requeues itself, and the
    requeued job writes the rows left, every row once.

`make test-slurm` installs SLURM and runs this module; without SLURM installed it is skipped,
unless REQUIRE_SLURM=1 (as `make test-slurm` sets)."""
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from tests import slurm_cluster
from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

if not slurm_cluster.installed():
    if os.environ.get("REQUIRE_SLURM"):
        raise RuntimeError("SLURM is not installed (make test-slurm installs it)")
    pytest.skip("SLURM is not installed (make test-slurm installs it)", allow_module_level=True)

ITERS = 10
# Rows the tools' jobs work through: enough that one cannot finish between its first written
# row and the scancel (with 6 rows of the tiny model it once did, and left no shard to resume from).
TOOL_ROWS = 64


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:32]))
    (tmp / "rows.jsonl").write_text("".join(rows[:TOOL_ROWS]))
    s = SimpleNamespace(tmp=tmp, model=make_tiny_model(tmp / "tiny", layers=2), train=tmp / "train.jsonl",
                        rows=tmp / "rows.jsonl")
    with slurm_cluster.cluster(tmp / "cluster") as env:
        s.env = {**env, "PYTHON": sys.executable}
        yield s


def sbatch(s, script, ntasks, *args):
    out = subprocess.run(["sbatch", "--parsable", "-n", str(ntasks), "--output", f"{s.tmp}/%x-%j.out",
                          f"launch/slurm/{script}", *map(str, args)],
                         cwd=ROOT, env=s.env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_state(s, job) -> str:
    """'' once the job has left the queue."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=s.env, capture_output=True, text=True).stdout.strip()


def wait_for(condition, what, s, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n" + slurm_cluster.log_tail(s.tmp / "cluster")
                                 + "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in s.tmp.glob("*.out")))
        time.sleep(0.2)


def logged(folder):
    try:
        return len(read_metrics(folder))
    except (FileNotFoundError, ValueError):
        return 0


def test_signalled_training_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(slurm):
    s = slurm
    flags = ["--model", s.model, "--train-data", s.train, "--seq-length", 128, "--micro-batch-size", 1,
             "--global-batch-size", 4, "--train-iters", ITERS, "--loss", "idft", "--lr", "1e-2",
             "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json"]
    job = sbatch(s, "pretrain_idft.sbatch", 2, *flags, "--save", s.tmp / "job")
    wait_for(lambda: logged(s.tmp / "job") >= 2, "two iterations", s)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=s.env, check=True)
    # SLURM holds a requeued job for a while (BeginTime); release it early. Not in the second of
    # the requeue: slurmd refuses a credential whose creation time (whole seconds) is not after the
    # old one's revocation ("Job credential revoked"), which is what that hold guards against.
    wait_for(lambda: job_state(s, job) == "PENDING", "the requeue", s)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=s.env, check=True)
    reference = launch(2, *flags, "--save", s.tmp / "torchrun", runner="torchrun")  # while the job waits
    assert reference.returncode == 0, reference.stderr[-3000:]
    wait_for(lambda: job_state(s, job) == "", "the requeued job to finish", s, timeout=600)

    log = (s.tmp / f"pretrain_idft-{job}.out").read_text()
    assert "restart 0" in log and "restart 1" in log, log[-3000:]
    assert "stopped on signal SIGUSR1" in log and "exit status 75" in log, log[-3000:]
    assert "the step saved and asked to be requeued" in log, log[-3000:]
    saved = int(re.search(r"saved \S*/iter_(\d{7})", log).group(1))
    assert 2 <= saved < ITERS
    job_metrics, ref = read_metrics(s.tmp / "job"), read_metrics(s.tmp / "torchrun")
    assert [m["iteration"] for m in job_metrics] == list(range(1, ITERS + 1))
    for a, b in zip(ref, job_metrics):
        for key in ("loss", "grad_norm", "lr", "phi_mean", "loss_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (a["iteration"], key)
    assert (s.tmp / "job" / "latest").read_text() == f"iter_{ITERS:07d}"


def test_cancelled_realignment_resubmitted_on_fewer_tasks_writes_every_row_once(slurm):
    s = slurm
    flags = ["--model", s.model, "--data", s.rows, "--max-new-tokens", 16, "--batch-size", 1, "--temperature", 0.3]
    out = s.tmp / "realign"
    shards = out / "shards"
    job = sbatch(s, "realign.sbatch", 2, *flags, "--out-dir", out)
    wait_for(lambda: sum(1 for p in shards.glob("*.part-*") for _ in open(p)) >= 1, "a realigned row", s)
    subprocess.run(["scancel", job], env=s.env, check=True)
    wait_for(lambda: job_state(s, job) == "", "the cancelled job to end", s)
    written = [json.loads(line)["index"] for p in shards.glob("*.part-*") for line in open(p)]
    assert len(written) == len(set(written)) and 1 <= len(written) < TOOL_ROWS, written
    assert not (out / "realigned.jsonl").exists()

    job2 = sbatch(s, "realign.sbatch", 1, *flags, "--out-dir", out)
    wait_for(lambda: job_state(s, job2) == "", "the resubmitted job to finish", s, timeout=600)
    # After the job, not beside it: two processes on the 2 cores of CI ran 50x slower a row.
    reference = launch(0, *flags, "--out-dir", s.tmp / "realign-ref", script="tools/realign_distributed.py")
    assert reference.returncode == 0, reference.stderr[-3000:]
    log = (s.tmp / f"realign-{job2}.out").read_text()
    assert f"resuming: {len(written)} rows already done" in log, log[-3000:]
    merged = [json.loads(line) for line in open(out / "realigned.jsonl")]
    ref = [json.loads(line) for line in open(s.tmp / "realign-ref" / "realigned.jsonl")]
    assert [r["prompt"] for r in merged] == [r["prompt"] for r in ref]  # every row once, in input order
    for a, b in zip(ref, merged):  # each row's sampling is seeded by the row: the same text
        assert b["realigned"] == a["realigned"]
        assert b["avg_phi_realigned"] == pytest.approx(a["avg_phi_realigned"], rel=1e-6)
    assert not list(shards.glob("*.part-*"))


def test_warned_evaluation_requeues_itself_and_writes_every_row_once(slurm):
    s = slurm
    out = s.tmp / "eval" / "out.jsonl"
    job = sbatch(s, "evaluate.sbatch", 2, "--model", s.model, "--data", s.rows, "--out", out, "--max-new-tokens", 16,
                 "--batch-size", 1, "--temperature", 0.3)
    wait_for(lambda: sum(1 for p in out.parent.glob("*.part-*") for _ in open(p)) >= 1, "an evaluated row", s)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=s.env, check=True)
    wait_for(lambda: job_state(s, job) == "PENDING", "the requeue", s)
    written = [json.loads(line)["index"] for p in out.parent.glob("*.part-*") for line in open(p)]
    assert len(written) == len(set(written)) and 1 <= len(written) < TOOL_ROWS, written
    time.sleep(2)  # see the training job's test: a requeued job's credential needs a later second
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=s.env, check=True)
    wait_for(lambda: job_state(s, job) == "", "the requeued job to finish", s, timeout=600)

    log = (s.tmp / f"evaluate-{job}.out").read_text()
    assert "stopped on signal SIGUSR1" in log and "the step saved and asked to be requeued" in log, log[-3000:]
    assert "restart 1" in log and f"resuming: {len(written)} rows already done" in log, log[-3000:]
    rows = [json.loads(line) for line in open(s.rows)]
    assert [r["prompt"] for r in map(json.loads, open(out))] == [r["prompt"] for r in rows]  # once each, in order
    assert json.loads(out.with_name("out.summary.json").read_text())["rows"] == TOOL_ROWS
    assert not list(out.parent.glob("*.part-*"))

"""Preemption without SLURM: SIGUSR1 / SIGTERM sent at random moments of a 2-rank training run
(to rank 0 only: the ranks must agree through the flag all-reduce) each lead to a checkpoint of
the iteration in progress and exit status 75; restarting the same command (no --load: it
continues from --save) reproduces the uninterrupted run's losses exactly. The wall-clock limit
(--exit-duration-in-mins) stops a run the same way.

CI sends 3 signals; PREEMPT_SIGNALS=10 sends 10 (the issue's count):
    PREEMPT_SIGNALS=10 python -m pytest -q tests/test_preempt.py"""
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from megatron_onpolicy import preempt
from megatron_onpolicy.train.checkpoint import has_complete
from tests.dist_utils import free_port, one_process_group, run_distributed
from tests.train_utils import ENTRY, ROOT, launch, make_tiny_model, read_metrics

# The status the sbatch scripts requeue on (the one the trainer must exit with), read from them.
REQUEUE_EXIT = int(re.search(r"^REQUEUE_EXIT=(\d+)$", (ROOT / "launch" / "slurm" / "common.sh").read_text(),
                             re.M).group(1))
SIGNALS = int(os.environ.get("PREEMPT_SIGNALS", "3"))
ITERS = 4 * SIGNALS + 4  # a signal costs at most 4 iterations (see below): some are left for the last run


def flags(s, out):
    return ["--model", s.model, "--train-data", s.train, "--seq-length", 128, "--micro-batch-size", 1,
            "--global-batch-size", 4, "--train-iters", ITERS, "--loss", "idft", "--lr", "1e-2", "--save", out,
            "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json"]


def start(args, n=2):
    """n ranks started with torch.distributed's environment, so that each one's PID is known."""
    port, procs = free_port(), []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(f"{args[args.index('--save') + 1]}.rank{rank}.log", "a+")
        procs.append(subprocess.Popen([sys.executable, ENTRY, *map(str, args)], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def logged(folder) -> list:
    try:
        return [m["iteration"] for m in read_metrics(folder)]
    except (FileNotFoundError, ValueError):  # not yet written, or a line half written
        return []


def wait_all(procs, timeout=600):
    return [p.wait(timeout=timeout) for p in procs]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:32]))
    s = SimpleNamespace(tmp=tmp, model=make_tiny_model(tmp / "tiny"), train=tmp / "train.jsonl")
    result = launch(2, *flags(s, tmp / "full"), runner="torchrun")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    s.full = read_metrics(tmp / "full")
    assert [m["iteration"] for m in s.full] == list(range(1, ITERS + 1))
    # An iteration's time once running: a process's first one also compiles the fused loss's kernel.
    s.step_s = statistics.median(m["tokens"] / m["tokens_per_s"] for m in s.full[1:])
    return s


def test_signals_at_random_moments_save_within_one_iteration_and_resume_exactly(setup):
    s, out, rng = setup, setup.tmp / "signalled", random.Random(os.environ.get("PREEMPT_SEED"))
    saved = []
    for k in range(SIGNALS):
        before = max(logged(out), default=0)
        procs = start(flags(s, out) + ["--exit-signal-handler"])
        deadline = time.time() + 300
        while max(logged(out), default=0) <= before and all(p.poll() is None for p in procs):
            assert time.time() < deadline, "no new iteration"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0 * s.step_s))  # any moment of the next two iterations
        done = max(logged(out))  # iterations finished when the signal is sent
        sig = (signal.SIGUSR1, signal.SIGTERM)[k % 2]
        procs[0].send_signal(sig)
        codes = wait_all(procs)
        tag = (out / "latest").read_text()
        saved.append((sig.name, done, tag))
        assert codes == [REQUEUE_EXIT] * 2, (codes, (out.parent / "signalled.rank0.log").read_text()[-3000:])
        assert has_complete(out)
        assert done <= int(tag[-7:]) <= done + 1, saved  # the iteration in progress, or the one just logged
        assert max(logged(out)) == int(tag[-7:]), "no iteration ran past the checkpoint"
    codes = wait_all(start(flags(s, out) + ["--exit-signal-handler"]))
    assert codes == [0, 0], (out.parent / "signalled.rank0.log").read_text()[-3000:]
    print("signals (name, iterations logged when sent, checkpoint):", saved)
    resumed = read_metrics(out)
    assert [m["iteration"] for m in resumed] == list(range(1, ITERS + 1))
    for a, b in zip(s.full, resumed):
        for key in ("loss", "grad_norm", "lr", "phi_mean", "loss_tokens", "epoch_position"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (a["iteration"], key)


def test_time_limit_saves_and_exits_for_requeue(setup):
    """--exit-duration-in-mins 0: the limit has passed at the first boundary, on every rank. A run
    given `--load A --save B` continues from B once B holds a checkpoint."""
    out = setup.tmp / "timed"
    codes = wait_all(start(flags(setup, out) + ["--exit-duration-in-mins", 0]))
    assert codes == [REQUEUE_EXIT] * 2
    assert (out / "latest").read_text() == "iter_0000001" and logged(out) == [1]
    assert read_metrics(out)[0]["loss"] == setup.full[0]["loss"]

    # Continued into another folder: the first start takes --load, every requeue its own --save
    # (were --load to win, each requeue would redo iteration 2 from `timed`'s checkpoint).
    branch = setup.tmp / "branch"
    for iteration in (2, 3):
        codes = wait_all(start(flags(setup, branch) + ["--load", out, "--exit-duration-in-mins", 0]))
        assert codes == [REQUEUE_EXIT] * 2
        assert (branch / "latest").read_text() == f"iter_{iteration:07d}"
    assert (out / "latest").read_text() == "iter_0000001"
    assert [(m["iteration"], m["loss"]) for m in read_metrics(branch)] == \
        [(m["iteration"], pytest.approx(m["loss"], rel=1e-6, abs=0)) for m in setup.full[1:3]]

    # DeepSpeed would restore the saved optimizer and schedule under the new flags: refused.
    other = start(flags(setup, setup.tmp / "other-lr") + ["--load", out, "--lr", "2e-2"])
    assert wait_all(other) == [2, 2]
    log = (setup.tmp / "other-lr.rank0.log").read_text()
    assert "cannot continue exactly with this run's settings: lr 0.01 -> 0.02" in log, log[-3000:]

    # The limit reached at the last iteration: the run is done, so it exports and ends (status 0).
    last = setup.tmp / "last"
    assert wait_all(start(flags(setup, last) + ["--train-iters", 1, "--exit-duration-in-mins", 0,
                                                "--export-hf", last / "hf"])) == [0, 0]
    assert (last / "hf" / "config.json").exists() and logged(last) == [1]


def test_the_time_limit_counts_minutes_from_start_up(monkeypatch):
    """--exit-duration-in-mins 0 (above) passes at once in any unit: 2 minutes are 120 s after
    the job's clock started (preempt._STARTED), not 2 s nor 2 hours."""
    stop = preempt.Stop((), 2)
    with one_process_group():
        for seconds, why in ((1.0, None), (119.0, None), (120.5, "time limit (--exit-duration-in-mins)")):
            monkeypatch.setattr(time, "time", lambda: preempt._STARTED + seconds)
            assert stop.agreed("cpu") == why, seconds


def _padded(rank, world_size):
    return preempt.in_lockstep([[f"row of rank {rank}"]] * (2 * rank + 1), "cpu")


def test_a_rank_with_fewer_batches_reaches_every_stop_check():
    """in_lockstep pads a rank's batches to the most any rank has (rank 1: 3, so rank 0's one and
    two empty ones): otherwise rank 1's next Stop.agreed would wait for a rank that has ended."""
    assert run_distributed(_padded, 2) == [["row of rank 0"], [], []]

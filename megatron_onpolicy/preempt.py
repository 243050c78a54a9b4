"""Stopping cleanly when the cluster asks, for the trainer and the tools alike.

SIGTERM (preemption, scancel) and SIGUSR1 (SLURM's `--signal=B:USR1@N` warning, forwarded by
launch/slurm/*.sbatch) only set a flag: a collective may be in flight, so nothing is done inside
the handler. At its next boundary (an iteration, a batch of rows) every rank calls `Stop.agreed`,
one MAX all-reduce of a tiny tensor on the rank's device that also carries the wall-clock limit
(--exit-duration-in-mins), so all ranks stop after the same boundary even if only one got the
signal. The job then saves what it has and exits with REQUEUE_EXIT, which the sbatch scripts
recognise: they requeue the job, and the requeued run resumes from what was saved.
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

REQUEUE_EXIT = 75  # EX_TEMPFAIL in sysexits.h: "try again later"; launch/slurm/*.sbatch requeue on it
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_STARTED = time.time()  # imported by the entry points before the model loads: the job's clock, as Megatron's


class Stop:
    """signals: which ones set the flag (none: only the time limit counts).
    minutes: stop once this much wall-clock time has passed since start-up."""

    def __init__(self, signals=SIGNALS, minutes=None):
        self.received = None
        self.deadline = None if minutes is None else _STARTED + 60.0 * minutes
        for s in signals:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def agreed(self, device, group=None) -> str | None:
        """Every rank of `group` calls this at the same boundary; -> why to stop (None: go on)."""
        local = torch.tensor([self.received is not None,
                              self.deadline is not None and time.time() >= self.deadline],
                             dtype=torch.float32, device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        got_signal, timed_out = local.tolist()
        if got_signal:
            return "signal" + (f" {signal.Signals(self.received).name}" if self.received else " on another rank")
        return "time limit (--exit-duration-in-mins)" if timed_out else None

    def exit_if_agreed(self, device, prog: str, where: str, group=None) -> None:
        why = self.agreed(device, group)
        if why:
            exit_for_requeue(prog, why, where)


def in_lockstep(batches: list, device) -> list:
    """This rank's batches, padded with empty ones to the most any rank has, so that all ranks
    reach every stop check (data-parallel groups can have different numbers of rows left)."""
    n = torch.tensor([len(batches)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return batches + [[]] * (int(n.item()) - len(batches))


def exit_for_requeue(prog: str, why: str, where: str) -> None:
    """After the caller has saved (and synchronised): say so once, and exit with REQUEUE_EXIT on
    every rank. os._exit: the other ranks exit at the same moment, so no teardown collective."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{prog}: stopped on {why}; {where}; exit status {REQUEUE_EXIT} (requeue to continue)", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(REQUEUE_EXIT)


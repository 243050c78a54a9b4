"""Run a function on N CPU processes joined by gloo, and bring back what rank 0 returns; or this
process alone as a world of one."""
import io
import os
import socket
import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # As bytes: tensors sent through the queue would live in this process's shared memory,
        # which is gone once it exits.
        buf = io.BytesIO()
        torch.save(result if rank == 0 else None, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report the failure instead of hanging the other ranks' test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args):
    """fn(rank, world_size, *args) runs on every rank; returns rank 0's result, raises any rank's error.

    fn must be importable (a module-level function) because the workers are spawned."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in procs:
        rank, status, payload = queue.get(timeout=900)
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
            break
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results[0]


@contextmanager
def one_process_group():
    """This process alone as a gloo world, for code that calls collectives on the default group
    (a barrier, a flag all-reduce) and is checked faster in-process than on spawned ranks."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()

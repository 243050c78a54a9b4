"""A data-parallel group's share of an input's rows, read as a stream in windows.

Group g of G takes rows g, g + G, g + 2G, ... (`shard_indices`), so a run restarted with another
number of groups still finds its rows in the shard files (outputs.open_shards). Each rank reads
the input once, front to back, and parses (and tokenizes) only its group's rows, `window` of them
at a time: memory is bounded by the window, not the input. A tool sorts a window by length for
its batches. A bad row stops the run at the end of its window on every rank at once (the first
error by rank), after the rows of earlier windows were written: fixing it and rerunning goes on
from there."""
import argparse
import itertools

import torch
import torch.distributed as dist

from .rows import DataError, RowStream


def add_stream_args(p: argparse.ArgumentParser, default: int = 4096) -> None:
    p.add_argument("--window", type=_window, default=default,
                   help="rows of this group's share read and prepared at a time (0: the whole share)")


def _window(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def share_windows(stream: RowStream, dp_rank: int, dp_size: int, window: int, done, prepare, device):
    """-> for each window of this group's share, [prepare(index, row) for its rows not in `done`].
    No rank counts the rows first (a JSONL file would be read through once more before any work):
    each window ends in one all-reduce of whether any rank's share goes on, so every rank yields
    the same number of windows; a DataError from `prepare` (or from parsing) on any rank is raised
    on all ranks once every rank has prepared that window. Afterwards `stream.rows` is known."""
    reader, start, more = stream.reader(), 0, True
    while more:
        positions = range(start, start + window) if window else itertools.count(start)
        start += window
        todo = (i for i in (dp_rank + p * dp_size for p in positions) if i not in done)
        items, error, more = [], None, False
        try:
            items = [prepare(i, row) for i, row in reader.read(todo)]
            more = bool(window) and reader.exists(dp_rank + start * dp_size)
        except DataError as e:
            error = str(e)
        more = _agree(error, more, device)
        yield items


def _agree(error, more: bool, device) -> bool:
    """One MAX all-reduce per window: -> whether any rank's share goes on. The messages are
    gathered only when some rank has one."""
    flags = torch.tensor([error is not None, more], dtype=torch.float32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    failed, more = flags.tolist()
    if failed:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, error)
        raise DataError(next(m for m in found if m), every_rank=True)
    return bool(more)

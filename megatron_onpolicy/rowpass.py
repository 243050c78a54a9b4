"""A row tool's pass over its input (tools/ddt_score.py, evaluate.py, realign_distributed.py).

Each data-parallel group streams its share of the rows in windows (data/stream.py) and cuts each
window into batches; the group's first tensor-parallel rank writes every finished row to the
group's shard file (outputs.py). The groups go through their batches in lockstep, each batch after
one agreed check for a stop (preempt.py), so a preempted or timed-out job stops every rank after
the same batch with every finished row written, and a rerun goes on from there. At the end the
ranks meet once, and rank 0 merges the shards alone (`merged`): the others exit rather than wait
for it in a barrier that gives up after --distributed-timeout-minutes."""
import sys
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from . import cli, preempt
from .data import RowStream
from .data.stream import share_windows
from .outputs import merge_shards, open_shards
from .parallel import state


class RowPass:
    def __init__(self, prog: str, data, shards, settings: dict):
        """Every rank, once the ranks are connected and before the model loads: the input (an error
        in it is one line, not one a rank) and the shards the rows go to (`shards`.part-*; rows a
        run wrote before are skipped, and a rerun with other `settings` is an error)."""
        self.prog, self.shards = prog, Path(shards)
        self.dp, self.dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
        self.stream = cli.on_every_rank(lambda: RowStream(data))
        writes = state.get_tensor_model_parallel_rank() == 0  # one writer a data-parallel group
        self.writer, self.done, self.n_done = open_shards(self.shards, self.dp_rank, self.dp, writes, cli.device(),
                                                          settings)
        if dist.get_rank() == 0 and self.n_done:
            print(f"resuming: {self.n_done} rows already done", flush=True)

    def run(self, stop: preempt.Stop, window: int, prepare, batches, process) -> None:
        """prepare(index, row) -> an item, or a DataError naming the row (raised on every rank, see
        share_windows); batches(a window's items) -> [batch]; process(batch) -> [(index, output row)].
        Every rank returns once every rank has written its last row."""
        device = cli.device()
        bar = tqdm(total=self.stream.total(), initial=self.n_done, desc=self.prog, unit="row",
                   disable=dist.get_rank() != 0, file=sys.stdout)
        for items in share_windows(self.stream, self.dp_rank, self.dp, window, self.done, prepare, device):
            bar.total = self.stream.total()  # (JSONL: estimated until the end)
            for batch in preempt.in_lockstep(batches(items), device):
                stop.exit_if_agreed(device, self.prog, f"finished rows are in {self.shards}.part-*")
                if not batch:
                    continue
                for i, row in process(batch):
                    if self.writer:
                        self.writer.write({"index": i, "row": row})
                bar.update(len(batch) * self.dp)  # every group advances about alike; rank 0 sees its own
        bar.close()
        if self.writer:
            self.writer.close()
        dist.barrier()

    def merged(self, final):
        """Rank 0 alone, after `run`: a context that writes every row in input order to `final`, and
        removes the shards once its block (which writes what derives from `final`) succeeds."""
        return merge_shards(self.shards, self.stream.rows, final, "row")


def batches_of(size: int):
    """batches for RowPass.run: a window's items in order, `size` at a time."""
    return lambda items: [items[k:k + size] for k in range(0, len(items), size)]

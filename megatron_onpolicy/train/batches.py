"""What each rank feeds the engine per iteration.

Every rank tokenizes the whole file (cheap next to training, and it needs no communication to
agree on which rows survive). An epoch is the kept samples in `epoch_order(seed, epoch)`, packed
into rows of --seq-length with --pack; iteration k of an epoch takes items [k*g, (k+1)*g) (a
short tail is skipped), DP rank r the items r, r+DP, ... of those, cut into GAS micro-batches of
m. The global batch is therefore the same set of samples whatever T, P, DP and m are, and the
position (epoch, offset) is all a checkpoint needs to resume the same data order."""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..cli import device
from ..data import (DataError, collate, collate_packed, epoch_order, fit_length, pack, read_rows, shard_indices,
                    tokenize_row)


@dataclass
class Samples:
    samples: list   # data.Sample, fitted to seq_length, in input order
    rows: int
    truncated: int
    dropped: int

    def describe(self, path) -> str:
        return (f"{path}: {self.rows} rows -> {len(self.samples)} samples "
                f"({self.truncated} truncated, {self.dropped} dropped as longer than --seq-length)")


def load_samples(path, tokenizer, args) -> Samples:
    rows = read_rows(path)
    kept, truncated = [], 0
    for i, row in enumerate(rows):
        sample = tokenize_row(tokenizer, row.data, row.source, i, args.prompt_key, args.response_key)
        fitted = fit_length(sample, args.seq_length, args.overlong)
        if fitted is not None:
            truncated += fitted is not sample
            kept.append(fitted)
    if not kept:
        raise DataError(f"{path}: all {len(rows)} rows are longer than --seq-length {args.seq_length} "
                        f"(--overlong {args.overlong} leaves no response token)")
    return Samples(kept, len(rows), truncated, len(rows) - len(kept))


@dataclass
class Position:
    epoch: int = 0
    offset: int = 0  # items of this epoch already consumed


class TrainBatches:
    def __init__(self, data: Samples, args, dp: int, dp_rank: int, dp_group, gas: int, global_batch: int):
        self.data, self.args = data, args
        self.dp, self.dp_rank, self.dp_group = dp, dp_rank, dp_group
        self.gas, self.global_batch = gas, global_batch
        self._epoch, self._items = None, None
        if self.iters_in_epoch(0) == 0:
            what = "packed rows" if args.pack else "samples"
            raise DataError(f"{args.train_data}: {len(self.items(0))} {what} < global batch size {global_batch}")

    def items(self, epoch: int) -> list:
        if self._epoch != epoch:  # one epoch's order (and packing) is kept at a time
            order = [self.data.samples[i] for i in epoch_order(len(self.data.samples), self.args.seed, epoch)]
            self._epoch, self._items = epoch, pack(order, self.args.seq_length) if self.args.pack else order
        return self._items

    def iters_in_epoch(self, epoch: int) -> int:
        return len(self.items(epoch)) // self.global_batch

    def total_iters(self) -> int:
        if self.args.train_iters:
            return self.args.train_iters
        return sum(self.iters_in_epoch(e) for e in range(self.args.epochs))

    def next(self, pos: Position):
        """-> (micro-batches of this rank, global counts {loss_tokens, tokens}, position after)."""
        while pos.offset + self.global_batch > len(self.items(pos.epoch)):  # the epoch's tail is skipped
            pos = Position(pos.epoch + 1, 0)
        items = self.items(pos.epoch)[pos.offset:pos.offset + self.global_batch]
        mine = [items[i] for i in shard_indices(len(items), self.dp_rank, self.dp)]
        m = len(mine) // self.gas
        micro = [to_micro_batch(mine[i * m:(i + 1) * m], self.args.pack) for i in range(self.gas)]
        # One all-reduce over DP gives the global batch's token counts (the loss denominator).
        counts = torch.tensor([sum(float(labels[1].sum()) for _, labels in micro),
                               sum(len(item.input_ids) for item in mine)], dtype=torch.float64, device=device())
        if self.dp > 1:
            dist.all_reduce(counts, group=self.dp_group)
        return micro, {"loss_tokens": counts[0].item(), "tokens": counts[1].item()}, \
            Position(pos.epoch, pos.offset + self.global_batch)


def to_micro_batch(items, packed: bool):
    """-> ((input_ids, position_ids[, segment_ids]), (targets, loss_mask)): what the pipeline's
    first stage and the loss on its last stage take. Padding sits right of every real token, so
    causal attention never lets it in and it is never a target: its id does not matter."""
    b = collate_packed(items, 0) if packed else collate(items, 0)
    inputs = (b["input_ids"], b["position_ids"]) + ((b["segment_ids"],) if packed else ())
    return inputs, (b["targets"], b["loss_mask"])


def valid_micro_batches(data: Samples, micro: int, dp: int, dp_rank: int) -> list:
    """This DP rank's share of the validation samples, m at a time; a rank left without any gets
    one batch with an empty loss mask, so that every rank takes part in the collectives."""
    mine = [data.samples[i] for i in shard_indices(len(data.samples), dp_rank, dp)]
    batches = [to_micro_batch(mine[i:i + micro], False) for i in range(0, len(mine), micro)]
    if not batches:
        inputs, (targets, mask) = to_micro_batch(data.samples[:1], False)
        batches = [(inputs, (targets, torch.zeros_like(mask)))]
    return batches

"""Tensor-parallel layers: vocab-parallel embedding, column- and row-parallel linear.

Parameters are allocated uninitialized: every model is loaded from a checkpoint, which fills
every parameter (the loader checks that none is left out)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from .mappings import copy_to_tp, gather_from_tp, reduce_from_tp


def tp_size_rank(group):
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary padded to a multiple of TP; padded rows are zero and excluded from statistics."""
    return math.ceil(vocab_size / tp) * tp


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split over the TP group."""

    def __init__(self, vocab_size, dim, tp_group=None, dtype=None):
        super().__init__()
        tp, rank = tp_size_rank(tp_group)
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.shard = padded_vocab_size(vocab_size, tp) // tp
        self.vocab_start = rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, dim, dtype=dtype))

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.tp_group)


class ColumnParallelLinear(nn.Module):
    """Y = X A^T with A's rows (outputs) split over TP; the output stays sharded unless gathered."""

    def __init__(self, in_features, out_features, bias=False, gather_output=False, tp_group=None,
                 dtype=None):
        super().__init__()
        tp, _ = tp_size_rank(tp_group)
        if out_features % tp:
            raise ValueError(f"output size {out_features} not divisible by TP={tp}")
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features // tp, dtype=dtype)) if bias else None

    def forward(self, x):
        y = F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = X A^T with A's columns (inputs) split over TP; takes a sharded input, sums the partials."""

    def __init__(self, in_features, out_features, bias=False, tp_group=None, dtype=None):
        super().__init__()
        tp, _ = tp_size_rank(tp_group)
        if in_features % tp:
            raise ValueError(f"input size {in_features} not divisible by TP={tp}")
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias

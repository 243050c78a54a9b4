"""Autograd-aware communication for tensor parallelism (Megatron's f / g operators).

Each takes the TP process group explicitly; with one rank they are identities."""
import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x, group):
    # In place on a fresh tensor: callers pass the output of a matmul, which autograd does not keep.
    dist.all_reduce(x, group=group)
    return x


def _gather_last(x, group):
    parts = [torch.empty_like(x) for _ in range(_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _split_last(x, group):
    rank = dist.get_rank(group)
    return x.chunk(_size(group), dim=-1)[rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient (the input feeds every rank's shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial results); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp(x, group):
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x, group):
    return x if _size(group) == 1 else _GatherFromTP.apply(x, group)

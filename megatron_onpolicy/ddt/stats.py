"""Per-token DDT statistics from vocab-parallel logits (DESIGN.md section 2).

Each tensor-parallel rank holds a contiguous slice of the vocabulary. Everything here needs one
MAX all-reduce (the global max logit m) and one packed SUM all-reduce of the four per-token
partial sums below; the full-vocab logits are never gathered.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# exp underflows to 0 in fp32 far above this, so clamping changes no sum, but it keeps a -inf
# logit (a banned token) from turning exp(d) * d into 0 * inf = nan.
_MIN_SHIFTED_LOGIT = -1e4


@dataclass
class TokenStats:
    """All fp32, shape == targets.shape, detached."""
    logp: Tensor         # log p_y
    entropy: Tensor      # H
    phi: Tensor          # log p_y + H
    var: Tensor          # Var_p[log p] = sum p (log p)^2 - H^2, clamped >= 0
    max_logit: Tensor    # m, the global max (the loss backward rebuilds softmax locally from it)
    log_sum_exp: Tensor  # log sum exp(z - m), so logsumexp(z) = m + log_sum_exp


def vocab_shard_range(shard_size: int, group=None, vocab_size: int = None) -> tuple[int, int]:
    """(first global id, number of real columns) of this rank's vocab shard.

    Columns past vocab_size are padding (vocab padded to a multiple of TP) and must be ignored."""
    start = 0 if group is None else dist.get_rank(group) * shard_size
    if vocab_size is None:
        return start, shard_size
    return start, max(0, min(shard_size, vocab_size - start))


def local_target_index(targets: Tensor, start: int, n_valid: int) -> tuple[Tensor, Tensor]:
    """(index into this shard, whether this shard owns the target).

    Targets of other shards, padding ids and ignore values such as -100 are not owned; their
    index is clamped into range so a gather stays legal and its result is simply discarded."""
    local = targets - start
    owned = (local >= 0) & (local < n_valid)
    return local.clamp(0, max(n_valid - 1, 0)), owned


@torch.no_grad()
def vocab_parallel_stats(logits: Tensor, targets: Tensor, group=None,
                         vocab_size: int = None) -> TokenStats:
    """DDT statistics of `targets` under softmax(logits), logits split along the vocab over `group`.

    logits: [..., V_shard], any float dtype; the rank with group rank r holds global ids
    [r * V_shard, (r + 1) * V_shard). targets: [...] global ids; any value is allowed at positions
    the caller masks out (the results there are finite and meaningless). group=None: one process.
    """
    start, n_valid = vocab_shard_range(logits.shape[-1], group, vocab_size)
    z = logits[..., :n_valid]  # a view: padded columns are never read, as if they were -inf

    if n_valid > 0:
        m = z.amax(dim=-1).float()  # the max of bf16 values is exact in fp32
    else:
        m = torch.full(targets.shape, float("-inf"), device=logits.device)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)

    # Mixed-dtype subtraction computes in fp32 and allocates the one fp32 copy of the shard;
    # the in-place ops below then touch only our own tensors, never the caller's logits.
    d = torch.sub(z, m.unsqueeze(-1)).clamp_(min=_MIN_SHIFTED_LOGIT)  # z - m <= 0
    e = torch.exp(d)
    s0 = e.sum(-1)
    s1 = e.mul_(d).sum(-1)
    s2 = e.mul_(d).sum(-1)
    index, owned = local_target_index(targets, start, n_valid)
    if n_valid > 0:
        zy = d.gather(-1, index.unsqueeze(-1)).squeeze(-1) * owned
    else:
        zy = torch.zeros_like(m)
    del d, e

    sums = torch.stack([s0, s1, s2, zy], dim=-1)
    if group is not None:
        dist.all_reduce(sums, group=group)
    s0, s1, s2, zy = sums.unbind(-1)

    log_s0 = torch.log(s0)
    mean_d = s1 / s0  # E_p[z - m]
    logp = zy - log_s0
    entropy = log_s0 - mean_d
    # log p_j = (z_j - m) - log S0 is a shift of z_j - m, so the variance is that of z - m.
    var = (s2 / s0 - mean_d * mean_d).clamp_(min=0.0)
    return TokenStats(logp=logp, entropy=entropy, phi=logp + entropy, var=var,
                      max_logit=m, log_sum_exp=log_s0)

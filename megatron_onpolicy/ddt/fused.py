"""The head matmul fused with the DDT statistics and the weighted loss, chunked over tokens.

From the final hidden states h [N, D] and this rank's vocab shard of the head weight W [V/TP, D],
the same numbers as `ddt_loss(h @ W^T, ...)` are computed without a [N, V/TP] logits tensor: one
chunk of tokens at a time, its fp32 logits are built, reduced to per-token partial sums and
dropped. The collectives are those of the unfused path, one MAX and one packed SUM all-reduce
for all chunks together: each chunk's partials are taken against the chunk's own (rank-local)
max m_l; once the global max m is known they are moved to it with delta = m_l - m <= 0:

    sum e^(z-m)           = a * s0                            a = e^delta
    sum e^(z-m) (z-m)     = a * (s1 + delta s0)
    sum e^(z-m) (z-m)^2   = a * (s2 + 2 delta s1 + delta^2 s0)

The backward recomputes each chunk's logits from h and W and the saved logsumexp, and needs no
collective: the caller passes h through `copy_to_tp`, whose backward sums h's gradient over TP
once. Logits, statistics and both gradients are accumulated in fp32 whatever the input dtype.
"""
import torch
from torch import Tensor

from .losses import IDFTConfig, token_weights, true_vocab_size
from .stats import TokenStats, local_target_index, vocab_shard_range

# A chunk's fp32 logits take about this many bytes (the statistics pass holds two such buffers).
CHUNK_BYTES = 64 << 20


def chunk_rows(n_cols: int, chunk_size: int = None) -> int:
    """Tokens per chunk: chunk_size if given, else as many as fit CHUNK_BYTES of fp32 logits."""
    if chunk_size is not None:
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * max(n_cols, 1)))


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


@torch.no_grad()
def fused_stats(hidden: Tensor, weight: Tensor, targets: Tensor, group=None, vocab_size: int = None,
                chunk_size: int = None) -> TokenStats:
    """`vocab_parallel_stats(hidden @ weight^T, targets, group, vocab_size)` without the logits.

    hidden: [..., D]; weight: [V_shard, D] (rows past vocab_size are padding and never read);
    targets: hidden.shape[:-1]."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    start, n_valid = vocab_shard_range(weight.shape[0], group, vocab_size)
    w = _fp32(weight[:n_valid])
    index, owned = local_target_index(y, start, n_valid)
    n = h.shape[0]
    # Rows: the local max m_l and s0, s1, s2, z_y - m_l against it.
    part = torch.zeros(5, n, device=h.device)
    part[0] = float("-inf")
    if n_valid > 0:
        rows = min(chunk_rows(n_valid, chunk_size), max(n, 1))
        # Two buffers for all chunks: fresh [rows, V/TP] allocations would each be page-faulted in anew.
        d_buf, e_buf = (torch.empty(rows, n_valid, device=h.device) for _ in range(2))
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            d = torch.mm(_fp32(h[r0:r1]), w.t(), out=d_buf[:r1 - r0])  # the chunk's fp32 logits
            m = d.amax(-1)
            d.sub_(m.unsqueeze(-1))  # finite: a matmul of finite values has no -inf logit to clamp
            e = torch.exp(d, out=e_buf[:r1 - r0])
            part[0, r0:r1] = m
            part[1, r0:r1] = e.sum(-1)
            part[2, r0:r1] = e.mul_(d).sum(-1)
            part[3, r0:r1] = e.mul_(d).sum(-1)
            part[4, r0:r1] = d.gather(-1, index[r0:r1].unsqueeze(-1)).squeeze(-1)
        del d_buf, e_buf
    m_local, s0, s1, s2, zy = part.unbind(0)

    m = m_local.clone()
    if group is not None:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    # A rank whose shard is empty or whose max underflows against m adds nothing to s0, s1, s2;
    # where() rather than products keeps its -inf or huge delta from making 0 * inf = nan. The
    # target's logit is exact whatever its rank's max (an owning rank has a finite one).
    delta = m_local - m
    a = torch.exp(delta)
    live = a > 0
    dl = torch.where(live, delta, 0.0)
    moments = torch.stack([a * s0, a * (s1 + dl * s0), a * (s2 + 2 * dl * s1 + dl * dl * s0)], dim=-1)
    sums = torch.cat([torch.where(live.unsqueeze(-1), moments, 0.0),
                      torch.where(owned, zy + delta, 0.0).unsqueeze(-1)], dim=-1)
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    s0, s1, s2, zy = sums.unbind(-1)

    log_s0 = torch.log(s0)
    mean_d = s1 / s0
    logp = zy - log_s0
    entropy = log_s0 - mean_d
    var = (s2 / s0 - mean_d * mean_d).clamp_(min=0.0)
    return TokenStats(*(t.reshape(shape) for t in (logp, entropy, logp + entropy, var, m, log_s0)))


class _FusedWeightedCE(torch.autograd.Function):
    """sum(coef * -log p_y) as a function of hidden and weight, coef = mask * w / denom detached."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, logp, log_z, start, n_valid, rows):
        ctx.save_for_backward(hidden, weight, targets, coef, log_z)
        ctx.start, ctx.n_valid, ctx.rows = start, n_valid, rows
        return -(coef * logp).sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, coef, log_z = ctx.saved_tensors
        start, n_valid, rows = ctx.start, ctx.n_valid, ctx.rows
        h = hidden.reshape(-1, hidden.shape[-1])
        scale = (grad_out * coef).reshape(-1)  # d loss / d z_j = scale * (p_j - 1[j == y])
        log_z = log_z.reshape(-1)
        index, owned = local_target_index(targets.reshape(-1), start, n_valid)
        w = _fp32(weight[:n_valid])
        grad_h = torch.zeros(h.shape, device=h.device)       # fp32 accumulation of both gradients
        grad_w = torch.zeros(weight.shape, device=h.device)  # padded rows keep a zero gradient
        n = h.shape[0] if n_valid > 0 else 0
        g_buf = torch.empty(min(rows, n), n_valid, device=h.device)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            hc = _fp32(h[r0:r1])
            g = torch.mm(hc, w.t(), out=g_buf[:r1 - r0])
            g.sub_(log_z[r0:r1].unsqueeze(-1)).exp_().mul_(scale[r0:r1].unsqueeze(-1))
            g.scatter_add_(-1, index[r0:r1].unsqueeze(-1), -(scale[r0:r1] * owned[r0:r1]).unsqueeze(-1))
            torch.mm(g, w, out=grad_h[r0:r1])
            grad_w[:n_valid].addmm_(g.t(), hc)
        return (grad_h.to(hidden.dtype).reshape(hidden.shape), grad_w.to(weight.dtype),
                None, None, None, None, None, None, None)


def fused_ddt_loss(hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor, kind: str, denom,
                   group=None, vocab_size: int = None, lam: float = 1.0, idft: IDFTConfig = IDFTConfig(),
                   chunk_size: int = None) -> tuple[Tensor, TokenStats, Tensor, Tensor]:
    """`ddt_loss(hidden @ weight^T, ...)`, differentiable in hidden and weight, chunk by chunk.

    Under TP, hidden must come through `copy_to_tp` (its gradient here is this rank's partial)."""
    stats = fused_stats(hidden, weight, targets, group, vocab_size, chunk_size)
    start, n_valid = vocab_shard_range(weight.shape[0], group, vocab_size)
    w, gamma = token_weights(kind, stats, lam, idft, true_vocab_size(weight.shape[0], group, vocab_size))
    coef = loss_mask.float() * w / denom
    log_z = stats.max_logit + stats.log_sum_exp
    loss = _FusedWeightedCE.apply(hidden, weight, targets, coef, stats.logp, log_z, start, n_valid,
                                  chunk_rows(n_valid, chunk_size))
    return loss, stats, w, gamma

"""The head matmul fused with the DDT statistics and the weighted loss, chunked over tokens.

From the final hidden states h [N, D] and this rank's vocab shard of the head weight W [V/TP, D],
the same numbers as `ddt_loss(h @ W^T, ...)` are computed without a [N, V/TP] logits tensor: one
chunk of tokens at a time, its fp32 logits are built, reduced to per-token partial sums and
dropped. Logits, statistics and both gradients are accumulated in fp32 whatever the input dtype.
bf16 h and W stay bf16 where the device multiplies bf16 matrices into fp32 (`out_dtype`: CUDA's
tensor cores; the logit gradient then goes into the two gradient matmuls rounded once to bf16);
elsewhere both are upcast to fp32 (W once per pass over the chunks).

TP = 1 with a gradient wanted: one pass. A chunk's partial sums are over the whole vocabulary, so
its statistics, token weights and logit gradient are known at once; the gradient goes into grad_h
and grad_W before the next chunk, three [N, D] x [D, V] matmuls in all (as in Liger's fused linear
cross-entropy), and the autograd backward only scales them by grad_out.

TP > 1, or no gradient: two passes. The collectives are those of the unfused path, one MAX and one
packed SUM all-reduce for all chunks together: each chunk's partials are taken against the chunk's
own (rank-local) max m_l; once the global max m is known they are moved to it with
delta = m_l - m <= 0:

    sum e^(z-m)           = a * s0                            a = e^delta
    sum e^(z-m) (z-m)     = a * (s1 + delta s0)
    sum e^(z-m) (z-m)^2   = a * (s2 + 2 delta s1 + delta^2 s0)

The backward recomputes each chunk's logits from h and W and the saved logsumexp, and needs no
collective: the caller passes h through `copy_to_tp`, whose backward sums h's gradient over TP
once.

A chunk's elementwise work is two kernels compiled by torch.compile by default (`set_kernels`;
inductor: C++ on the CPU, Triton on CUDA), where eager ops make several passes over the
[rows, V/TP] buffers: the row max, e = exp(z - m) and the three sums read the logits twice and
write e once (eager: about eight passes); the two-pass backward's logit gradient reads the logits
once and writes the gradient once, in place in fp32 and as the bf16 copy bf16 matmuls take (eager:
two fp32 passes in place, and in bf16 a third that rounds). "eager" is the same arithmetic in torch
ops, without a compiler.
"""
import functools

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .losses import IDFTConfig, token_weights, true_vocab_size
from .stats import TokenStats, local_target_index, vocab_shard_range

# The [rows, V/TP] fp32 buffers of a chunk loop take at least CHUNK_BYTES and at most CHUNK_CAP
# bytes together (two in the statistics pass, one in the two-pass backward, two in the one pass,
# three with eager kernels).
CHUNK_BYTES = 128 << 20
CHUNK_CAP = 1 << 30
KERNELS = ("compiled", "eager")
_kernels = "compiled"


def set_kernels(name: str):
    """How the process computes a chunk's elementwise sums: "compiled" (one torch.compile'd kernel)
    or "eager" (torch ops; no compiler needed)."""
    global _kernels
    if name not in KERNELS:
        raise ValueError(f"fused loss kernels: one of {KERNELS}, not {name!r}")
    _kernels = name


def chunk_rows(n_cols: int, dim: int, chunk_size: int = None, buffers: int = 2) -> int:
    """Tokens per chunk: chunk_size if given, else as many as `buffers` fp32 buffers of n_cols
    columns fit in the fp32 size of the weight shard [n_cols, dim], kept between CHUNK_BYTES and
    CHUNK_CAP. Every chunk reads the shard (and adds to its gradient) once more, so chunks much
    shorter than dim rows lean on that memory traffic more than on their matmuls; buffers the size
    of the shard's fp32 gradient at most double what the loss holds anyway. The cap matters for
    big shards: at V = 151936, D = 3584 the shard is 2.18 GB, and 588-row chunks (three buffers)
    still do 2 x 588 flops per weight element read, compute-bound on CPUs and GPUs alike."""
    if chunk_size is not None:
        return chunk_size
    n_cols = max(n_cols, 1)
    return max(1, min(max(CHUNK_BYTES, 4 * n_cols * dim), CHUNK_CAP) // (4 * buffers * n_cols))


@functools.cache
def _mm_into_fp32(device) -> bool:
    """Whether torch multiplies bf16 matrices into fp32 on this device (`mm` with `out_dtype`,
    fp32 accumulation and output) and adds them to an fp32 matrix (`addmm`, as `_add_grads` does).
    CUDA has the kernels; the CPU has none (torch 2.13)."""
    x = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    out = torch.zeros(1, 1, device=device)
    try:
        torch.mm(x, x, out_dtype=torch.float32, out=out)
        torch.addmm(out, x, x, out_dtype=torch.float32, out=out)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return True


def _operand_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype h and W enter the loop's matmuls in: bf16 where both are and their device
    multiplies bf16 into fp32, else fp32 (fp16's range is too narrow for the logit gradient)."""
    if hidden.dtype == weight.dtype == torch.bfloat16 and _mm_into_fp32(weight.device):
        return torch.bfloat16
    return torch.float32


def _mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b with out fp32, for fp32 or bf16 operands (fp32 accumulation either way)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _chunks(n: int, rows: int):
    """The token ranges of the chunks, the last one ragged."""
    for r0 in range(0, n, rows):
        yield slice(r0, min(r0 + rows, n))


def _buffers(count: int, rows: int, n: int, n_cols: int, device) -> list[Tensor]:
    """count chunk buffers reused by all chunks: fresh [rows, V/TP] allocations would each be
    page-faulted in anew."""
    return [torch.empty(min(rows, n), n_cols, device=device) for _ in range(count)]


def _bf16_in(buf: Tensor) -> Tensor:
    """A bf16 tensor of buf's shape in the first half of the (contiguous) fp32 buf's bytes: the
    one pass's logits buffer is free once a chunk's partial sums are taken."""
    return buf.view(torch.bfloat16).view(-1)[:buf.numel()].view(buf.shape)


def _moments(d: Tensor, e_out: Tensor):
    """(m, s0, s1, s2) of the fp32 logits d [rows, V/TP]: m the row max (rank-local), e = exp(d - m)
    written to e_out, s_k = sum e (d - m)^k. Finite: a matmul of finite values has no -inf logit.
    The products and sums are fp64: inductor's CPU reductions add up to 4096 terms a lane in
    sequence, which in fp32 lost up to 1e-5 of s0 at V = 151936 (torch's own sum, 1e-7). The
    kernel still reads and writes fp32, so they cost little time; the caller rounds the sums to
    fp32 (rounding them in here made inductor's CPU kernel twice as slow)."""
    m = d.amax(-1)
    x = d - m.unsqueeze(-1)
    e = torch.exp(x)
    e_out.copy_(e)
    e, x = e.double(), x.double()
    ex = e * x
    return m, e.sum(-1), ex.sum(-1), (ex * x).sum(-1)


def _logit_grad(d: Tensor, log_z: Tensor, index: Tensor, s_y: Tensor, scale: Tensor, g_out: Tensor):
    """g_out = scale * (exp(d - log_z) - s_y 1[j == index]), row by row, for the fp32 logits d: the
    two-pass backward's logit gradient, written once in g_out's dtype (bf16 operands: rounded once).
    g_out may be d itself (fp32)."""
    p = torch.exp(d - log_z.unsqueeze(-1))
    target = torch.arange(d.shape[-1], device=d.device) == index.unsqueeze(-1)
    g_out.copy_(torch.where(target, p - s_y.unsqueeze(-1), p) * scale.unsqueeze(-1))


@functools.cache
def _compiled(kernel):
    # dynamic: the rows change from chunk to chunk (the last is ragged) and step to step (the loss
    # tokens of a micro-batch); a process then holds a few graphs a kernel, not one per shape
    # (inductor specializes rows == 1 and V/TP below 4097).
    return torch.compile(kernel, fullgraph=True, dynamic=True)


def _run_compiled(kernel, *args):
    """kernel through torch.compile (built at its first call for a shape); a build that fails (no
    C++ compiler for inductor's CPU code, no Triton) says how to run without one."""
    try:
        return _compiled(kernel)(*args)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        cause = f"{type(e.inner_exception).__name__}: {str(e.inner_exception).splitlines()[0]}"
        raise RuntimeError(f"ddt/fused.py: torch.compile could not build the fused loss's {kernel.__name__} kernel "
                           f"({cause}); --fused-loss-kernel eager (the trainer, tools/ddt_score.py) "
                           "runs the same arithmetic as torch ops") from e


def _compiled_now() -> bool:
    """Whether this call runs the compiled kernel: if so set, and outside a TorchDispatchMode
    (FlopCounterMode, a debug mode), under which dynamo does not compile."""
    return _kernels == "compiled" and not is_in_torch_dispatch_mode(include_infra_modes=False)


def _chunk_partials(d: Tensor, index: Tensor, e_buf: Tensor, ed_buf: Tensor, compiled: bool):
    """(m, s0, s1, s2, z_y - m) of one chunk's fp32 logits d (see `_moments`), e left in e_buf; d
    is spent. ed_buf: the eager kernels' scratch, e_buf where e is not needed afterwards (e is then
    overwritten), a third buffer where it is; the compiled kernel takes none (None)."""
    zy = d.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    if compiled:
        # detach(): chunks are views of the buffers, and dynamo guards on a view's base's sizes.
        m, *sums = _run_compiled(_moments, d.detach(), e_buf.detach())
        return m, *(t.float() for t in sums), zy - m
    m = d.amax(-1)
    d.sub_(m.unsqueeze(-1))
    e = torch.exp(d, out=e_buf)
    s0 = e.sum(-1)
    ed = torch.mul(e, d, out=ed_buf)
    s1 = ed.sum(-1)
    s2 = ed.mul_(d).sum(-1)
    return m, s0, s1, s2, zy - m


def _token_stats(m: Tensor, s0: Tensor, s1: Tensor, s2: Tensor, zy: Tensor) -> TokenStats:
    """The statistics from the full-vocab sums against the global max m (zy: z_y - m)."""
    log_s0 = torch.log(s0)
    mean_d = s1 / s0
    logp = zy - log_s0
    entropy = log_s0 - mean_d
    var = (s2 / s0 - mean_d * mean_d).clamp_(min=0.0)
    return TokenStats(logp, entropy, logp + entropy, var, m, log_s0)


def _reshaped(stats: TokenStats, shape) -> TokenStats:
    return TokenStats(*(t.reshape(shape) for t in vars(stats).values()))


def _add_grads(g: Tensor, c: Tensor, hc: Tensor, w: Tensor, grad_h: Tensor, grad_w: Tensor):
    """Write one chunk's rows of grad_h and add its part to grad_w (the real vocab rows) for the
    logit gradient c * g, g [rows, V/TP] in the operands' dtype; c: the row factor, on the [rows, D]
    side of each matmul (None where g holds it already)."""
    if grad_h is not None:
        _mm(g, w, grad_h)
        if c is not None:
            grad_h.mul_(c.unsqueeze(-1))
    if grad_w is not None:
        b = hc if c is None else hc * c.unsqueeze(-1)
        if g.dtype == grad_w.dtype:
            grad_w.addmm_(g.t(), b)
        else:
            torch.addmm(grad_w, g.t(), b, out_dtype=grad_w.dtype, out=grad_w)


def _accumulate_grads(e: Tensor, c: Tensor, s0_y: Tensor, index: Tensor, hc: Tensor, w: Tensor,
                      grad_h: Tensor, grad_w: Tensor, spare: Tensor = None):
    """`_add_grads` for the logit gradient c * (e_j - s0_y 1[j == y]), e fp32. The one-hot term is
    one scatter into e. In fp32 the row factor c goes on the [rows, D] side of each matmul, so the
    [rows, V/TP] buffer takes no other pass; bf16 operands need a bf16 logit gradient, and c goes
    into that one copy (to spare, a [rows, V/TP] bf16 buffer)."""
    e.scatter_add_(-1, index.unsqueeze(-1), -s0_y.unsqueeze(-1))
    if w.dtype == torch.float32:
        _add_grads(e, c, hc, w, grad_h, grad_w)
    else:
        _add_grads(torch.mul(e, c.unsqueeze(-1), out=spare), None, hc, w, grad_h, grad_w)


@torch.no_grad()
def fused_stats(hidden: Tensor, weight: Tensor, targets: Tensor, group=None, vocab_size: int = None,
                chunk_size: int = None) -> TokenStats:
    """`vocab_parallel_stats(hidden @ weight^T, targets, group, vocab_size)` without the logits.

    hidden: [..., D]; weight: [V_shard, D] (rows past vocab_size are padding and never read);
    targets: hidden.shape[:-1]."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    start, n_valid = vocab_shard_range(weight.shape[0], group, vocab_size)
    dt = _operand_dtype(h, weight)
    w = weight[:n_valid].to(dt)
    index, owned = local_target_index(targets.reshape(-1), start, n_valid)
    n = h.shape[0]
    # Rows: the local max m_l and s0, s1, s2, z_y - m_l against it.
    part = torch.zeros(5, n, device=h.device)
    part[0] = float("-inf")
    if n_valid > 0:
        rows, compiled = chunk_rows(n_valid, weight.shape[-1], chunk_size), _compiled_now()
        d_buf, e_buf = _buffers(2, rows, n, n_valid, h.device)
        for rs in _chunks(n, rows):
            k = rs.stop - rs.start
            d = _mm(h[rs].to(dt), w.t(), d_buf[:k])  # the chunk's fp32 logits
            part[:, rs] = torch.stack(_chunk_partials(d, index[rs], e_buf[:k], e_buf[:k], compiled))
        del d_buf, e_buf
    m_local, s0, s1, s2, zy = part.unbind(0)

    m = m_local.clone()
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
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
        dist.all_reduce(sums, group=group)
    return _reshaped(_token_stats(m, *sums.unbind(-1)), shape)


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
        start, n_valid = ctx.start, ctx.n_valid
        h = hidden.reshape(-1, hidden.shape[-1])
        scale = (grad_out * coef).reshape(-1)  # d loss / d z_j = scale * (p_j - 1[j == y])
        log_z = log_z.reshape(-1)
        index, owned = local_target_index(targets.reshape(-1), start, n_valid)
        dt = _operand_dtype(h, weight)
        w = weight[:n_valid].to(dt)
        grad_h = torch.zeros(h.shape, device=h.device)       # fp32 accumulation of both gradients
        grad_w = torch.zeros(weight.shape, device=h.device)  # padded rows keep a zero gradient
        n = h.shape[0] if n_valid > 0 else 0
        compiled = _compiled_now()
        (d_buf,) = _buffers(1, ctx.rows, n, n_valid, h.device)
        # bf16 operands: the bf16 copy of the logit gradient that the matmuls take.
        g_buf = torch.empty_like(d_buf, dtype=dt) if dt == torch.bfloat16 else None
        for rs in _chunks(n, ctx.rows):
            k, hc = rs.stop - rs.start, h[rs].to(dt)
            d = _mm(hc, w.t(), d_buf[:k])
            if compiled:
                # In fp32 the gradient overwrites the logits: the same tensor as input and output
                # makes inductor's kernel work in place (its own loads before its stores).
                d = d.detach()
                g = d if g_buf is None else g_buf[:k].detach()
                _run_compiled(_logit_grad, d, log_z[rs], index[rs], owned[rs].float(), scale[rs], g)
                _add_grads(g, None, hc, w, grad_h[rs], grad_w[:n_valid])
            else:
                p = d.sub_(log_z[rs].unsqueeze(-1)).exp_()
                _accumulate_grads(p, scale[rs], owned[rs].float(), index[rs], hc, w, grad_h[rs], grad_w[:n_valid],
                                  None if g_buf is None else g_buf[:k])
        return (grad_h.to(hidden.dtype).reshape(hidden.shape), grad_w.to(weight.dtype),
                None, None, None, None, None, None, None)


@torch.no_grad()
def _one_pass(hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor, denom, n_valid: int,
              chunk_size: int, weights_of):
    """TP = 1: (stats, w, gamma, coef) and the fp32 gradients of sum(coef * -log p_y) in hidden and
    weight (None for one that needs none), in one pass over the chunks. Its [rows, V] buffers: the
    logits and e, and the eager kernels' scratch."""
    h = hidden.reshape(-1, hidden.shape[-1])
    mask = loss_mask.reshape(-1).float()
    n = h.shape[0]
    dt = _operand_dtype(h, weight)
    w = weight[:n_valid].to(dt)
    index, owned = local_target_index(targets.reshape(-1), 0, n_valid)
    out = torch.empty(9, n, device=h.device)  # the six TokenStats fields, w, gamma, coef
    grad_h = torch.empty(h.shape, device=h.device) if hidden.requires_grad else None  # every row written
    grad_w = torch.zeros(weight.shape, device=h.device) if weight.requires_grad else None  # padding stays 0
    compiled = _compiled_now()
    n_bufs = 2 if compiled else 3
    rows = chunk_rows(n_valid, weight.shape[-1], chunk_size, buffers=n_bufs)
    bufs = _buffers(n_bufs, rows, n, n_valid, h.device)
    for rs in _chunks(n, rows):
        k, hc = rs.stop - rs.start, h[rs].to(dt)
        d_buf, e, *scratch = (b[:k] for b in bufs)
        m, s0, s1, s2, zy = _chunk_partials(_mm(hc, w.t(), d_buf), index[rs], e, scratch[0] if scratch else None,
                                            compiled)
        stats = _token_stats(m, s0, s1, s2, torch.where(owned[rs], zy, 0.0))
        tw, gamma = weights_of(stats)
        coef = mask[rs] * tw / denom
        out[:, rs] = torch.stack([*vars(stats).values(), tw, gamma, coef])
        # d loss / d z_j = coef * (p_j - 1[j == y]) with p_j = e_j / s0.
        _accumulate_grads(e, coef / s0, s0 * owned[rs], index[rs], hc, w,
                          None if grad_h is None else grad_h[rs], None if grad_w is None else grad_w[:n_valid],
                          _bf16_in(d_buf) if dt == torch.bfloat16 else None)
    *fields, tw, gamma, coef = (t.reshape(targets.shape) for t in out)
    return TokenStats(*fields), tw, gamma, coef, (grad_h, grad_w)


class _PrecomputedGradCE(torch.autograd.Function):
    """sum(coef * -log p_y) whose fp32 gradients in hidden and weight `_one_pass` already formed."""

    @staticmethod
    def forward(ctx, hidden, weight, coef, logp, grads):
        # grads on ctx, not saved: backward drops them so that autograd may take the returned
        # fp32 tensors as .grad without a copy.
        ctx.grads, ctx.shape, ctx.dtypes = grads, hidden.shape, (hidden.dtype, weight.dtype)
        return -(coef * logp).sum()

    @staticmethod
    def backward(ctx, grad_out):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused loss's gradients were already taken (backward twice through it)")
        grad_h, grad_w = (None if g is None else g.mul_(grad_out).to(dtype)
                          for g, dtype in zip(grads, ctx.dtypes))
        return None if grad_h is None else grad_h.reshape(ctx.shape), grad_w, None, None, None


def fused_ddt_loss(hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor, kind: str, denom,
                   group=None, vocab_size: int = None, lam: float = 1.0, idft: IDFTConfig = IDFTConfig(),
                   chunk_size: int = None) -> tuple[Tensor, TokenStats, Tensor, Tensor]:
    """`ddt_loss(hidden @ weight^T, ...)`, differentiable in hidden and weight, chunk by chunk.

    Under TP, hidden must come through `copy_to_tp` (its gradient here is this rank's partial)."""
    vocab = true_vocab_size(weight.shape[0], group, vocab_size)

    def weights_of(stats):
        return token_weights(kind, stats, lam, idft, vocab)

    one_rank = group is None or dist.get_world_size(group) == 1
    if one_rank and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        n_valid = vocab_shard_range(weight.shape[0], group, vocab_size)[1]
        stats, w, gamma, coef, grads = _one_pass(hidden, weight, targets, loss_mask, denom, n_valid, chunk_size,
                                                 weights_of)
        return _PrecomputedGradCE.apply(hidden, weight, coef, stats.logp, grads), stats, w, gamma
    return _two_pass(hidden, weight, targets, loss_mask, denom, group, vocab_size, chunk_size, weights_of)


def _two_pass(hidden: Tensor, weight: Tensor, targets: Tensor, loss_mask: Tensor, denom, group, vocab_size: int,
              chunk_size: int, weights_of):
    """TP > 1, or no gradient: the statistics pass (the collectives), then a loss whose backward
    rebuilds each chunk's logits. (At TP = 1 the benches and GPU tests call it for what a TP rank runs.)"""
    start, n_valid = vocab_shard_range(weight.shape[0], group, vocab_size)
    stats = fused_stats(hidden, weight, targets, group, vocab_size, chunk_size)
    w, gamma = weights_of(stats)
    coef = loss_mask.float() * w / denom
    log_z = stats.max_logit + stats.log_sum_exp
    loss = _FusedWeightedCE.apply(hidden, weight, targets, coef, stats.logp, log_z, start, n_valid,
                                  chunk_rows(n_valid, weight.shape[-1], chunk_size))
    return loss, stats, w, gamma

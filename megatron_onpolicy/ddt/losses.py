"""ce / dft / idft / eaft token losses on vocab-parallel logits (DESIGN.md section 2).

All four are a weighted cross-entropy, -w * log p_y with a detached weight w, so they share one
autograd function whose backward is the CE gradient scaled by w and needs no collective.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .stats import TokenStats, local_target_index, vocab_parallel_stats, vocab_shard_range

LOSS_KINDS = ("ce", "dft", "idft", "eaft")


@dataclass
class IDFTConfig:
    beta: float = 1.0
    gamma_min: float = 0.1
    gamma_max: float = 2.0
    warmup_ratio: float = 0.0
    transition_ratio: float = 0.0


def idft_lambda(progress: float, warmup_ratio: float, transition_ratio: float) -> float:
    """IDFT strength at training progress step / total_steps: 0 during warmup, a linear ramp over
    transition_ratio, then 1 (no transition: a step to 1 at the end of warmup)."""
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio <= 0:
        return 1.0
    return min(1.0, (progress - warmup_ratio) / transition_ratio)


def token_weights(kind: str, stats: TokenStats, lam: float, cfg: IDFTConfig,
                  vocab_size: int) -> tuple[Tensor, Tensor]:
    """(w, gamma): the detached per-token weight w and gamma (fp32), the exponent in w = p_y ** gamma
    of ce / dft / idft; eaft's w = H / log V (V the true vocab size) is no power of p_y: gamma 0."""
    logp = stats.logp.detach().float()
    if kind == "eaft":
        return stats.entropy.detach().float() / math.log(vocab_size), torch.zeros_like(logp)
    if kind == "ce":
        gamma = torch.zeros_like(logp)
    elif kind == "dft":
        gamma = torch.ones_like(logp)
    elif kind == "idft":
        # phi < 0 (the token is less likely than the model's own samples) raises gamma and so
        # shrinks the weight of off-policy tokens; exp overflow to inf is caught by the clamp.
        raw = torch.exp(-stats.phi.detach().float() / cfg.beta).clamp_(cfg.gamma_min, cfg.gamma_max)
        gamma = 1.0 + lam * (raw - 1.0)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    # exp(gamma * log p) rather than p ** gamma: no underflow of p before the power.
    return torch.exp(gamma * logp), gamma


class _WeightedVocabParallelCE(torch.autograd.Function):
    """sum(coef * -log p_y) with coef = mask * w / denom detached.

    The backward rebuilds p_j on this rank's shard from the saved logits and the already reduced
    m and log_sum_exp, so it needs no communication."""

    @staticmethod
    def forward(ctx, logits, targets, coef, logp, max_logit, log_sum_exp, start, n_valid):
        ctx.save_for_backward(logits, targets, coef, max_logit, log_sum_exp)
        ctx.start, ctx.n_valid = start, n_valid
        return -(coef * logp).sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, coef, max_logit, log_sum_exp = ctx.saved_tensors
        start, n_valid = ctx.start, ctx.n_valid
        scale = grad_out * coef  # d loss / d z_j = scale * (p_j - 1[j == y])
        lse = (max_logit + log_sum_exp).unsqueeze(-1)
        grad = torch.sub(logits[..., :n_valid], lse).exp_().mul_(scale.unsqueeze(-1))  # fp32
        if n_valid > 0:
            index, owned = local_target_index(targets, start, n_valid)
            grad.scatter_add_(-1, index.unsqueeze(-1), -(scale * owned).unsqueeze(-1))
        if n_valid == logits.shape[-1]:
            grad_logits = grad.to(logits.dtype)
        else:  # padded columns take no gradient
            grad_logits = logits.new_zeros(logits.shape)
            grad_logits[..., :n_valid] = grad
        return grad_logits, None, None, None, None, None, None, None


def true_vocab_size(shard_size: int, group=None, vocab_size: int = None) -> int:
    """vocab_size, or (None: no padding) the whole width of the TP group's shards."""
    if vocab_size is not None:
        return vocab_size
    return shard_size * (1 if group is None else dist.get_world_size(group))


def ddt_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor, kind: str, denom,
             group=None, vocab_size: int = None, lam: float = 1.0,
             idft: IDFTConfig = IDFTConfig()) -> tuple[Tensor, TokenStats, Tensor, Tensor]:
    """(loss, stats, w, gamma) with loss = sum(loss_mask * w * -log p_y) / denom.

    denom is given by the caller (the loss-token count of the whole global batch), never taken from
    this micro-batch's mask. Every rank of the TP group returns the same fp32 loss."""
    stats = vocab_parallel_stats(logits, targets, group, vocab_size)
    start, n_valid = vocab_shard_range(logits.shape[-1], group, vocab_size)
    w, gamma = token_weights(kind, stats, lam, idft, true_vocab_size(logits.shape[-1], group, vocab_size))
    coef = loss_mask.float() * w / denom
    loss = _WeightedVocabParallelCE.apply(logits, targets, coef, stats.logp, stats.max_logit,
                                          stats.log_sum_exp, start, n_valid)
    return loss, stats, w, gamma

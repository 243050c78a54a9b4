"""The trainer's loss function (train/loss.py): with the fused head only the loss tokens reach the
matmuls, and the loss, both gradients and the recorded sums equal those of the unfused path, which
builds every position's logits; also for a micro-batch without a single loss token."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_onpolicy.ddt import LOSS_KINDS, IDFTConfig
from megatron_onpolicy.train.loss import TrainLoss
from megatron_onpolicy.train.metrics import cat

B, L, D, V = 3, 9, 16, 40


def batch(seed, loss_tokens=True):
    """hidden, targets, mask of one micro-batch: 12 loss tokens (none without loss_tokens)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g) * 2
    mask = torch.zeros(B, L)
    if loss_tokens:
        mask[0, 3:7] = 1  # a response in the middle, then padding
        mask[2, 1:] = 1   # row 1: prompt or padding only
    targets = torch.randint(0, V, (B, L), generator=g).masked_fill(mask == 0, -100)
    return hidden, targets, mask


def run(fused, kind, weight, cases):
    """(losses, hidden grads, weight grad, recorded sums, kept phi, head matmul flops) over the
    micro-batches `cases`, through one TrainLoss as an iteration runs them."""
    fn = TrainLoss(kind, IDFTConfig(), None, V, keep_tokens=True)
    fn.denom, fn.lam = 5.0, 0.7
    w = weight.clone().requires_grad_()
    losses, grads = [], []
    with FlopCounterMode(display=False) as flops:
        for hidden, targets, mask in cases:
            h = hidden.clone().requires_grad_()
            loss = fn((h, w) if fused else F.linear(h, w), (targets, mask))
            loss.backward()
            losses.append(loss.detach())
            grads.append(h.grad)
    return losses, grads, w.grad, fn.sums, cat(fn.phi), flops.get_total_flops()


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_fused_loss_reads_loss_tokens_only(kind):
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(9))
    cases = [batch(0), batch(1, loss_tokens=False), batch(2)]
    fused, unfused = run(True, kind, weight, cases), run(False, kind, weight, cases)
    for a, b in zip([*fused[0], *fused[1], *fused[2:5]], [*unfused[0], *unfused[1], *unfused[2:5]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused[3][LOSS_KINDS.index(kind)] > 0 and fused[4].numel() == 2 * 12
    # The head's matmuls scale with the 2 x 12 loss tokens, not with the 3 x 27 positions: the
    # same batches with every position a loss token cost 81 / 24 times the flops.
    everything = [(h, torch.randint(0, V, (B, L)), torch.ones(B, L)) for h, _, _ in cases]
    assert fused[5] > 0 and fused[5] * 3 * B * L == run(True, kind, weight, everything)[5] * 2 * 12

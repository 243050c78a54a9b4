"""The trainer's loss function (train/loss.py): with the fused head only the loss tokens reach the
matmuls, and the loss, both gradients and the recorded sums equal those of the unfused path, which
builds every position's logits; also for a micro-batch without a single loss token."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_onpolicy.data import Sample, collate
from megatron_onpolicy.ddt import LOSS_KINDS, IDFTConfig
from megatron_onpolicy.train.loss import SUMS, TrainLoss
from megatron_onpolicy.train.metrics import cat, token_summary

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


def test_validation_keeps_no_tokens():
    """The histograms' tokens are training's: validation's micro-batches (the whole validation
    set's, at each evaluation) add their sums but keep no per-token values."""
    fn = TrainLoss("idft", IDFTConfig(), None, V, keep_tokens=True)
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(9))
    fn.evaluating = True
    for fused in (True, False):
        hidden, targets, mask = batch(int(fused))
        fn((hidden, weight) if fused else F.linear(hidden, weight), (targets, mask))
    assert fn.phi == fn.gamma == [] and fn.sums[SUMS.index("tokens")] == 2 * 12


def collated_cases():
    """Micro-batches as data.collate builds them: prompt positions keep their real targets (the
    next prompt token) with loss mask 0, only padding has -100. 12 loss tokens each; hidden
    scaled so that phi < -1 holds for about half of the loss and of the prompt positions."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for lengths in ([(5, 4), (7, 2), (3, 6)], [(6, 3), (2, 7), (8, 2)]):  # (prompt, response) per row
        samples = [Sample(torch.randint(0, V, (p + r,), generator=g).tolist(), [0] * p + [1] * r, p, k)
                   for k, (p, r) in enumerate(lengths)]
        b = collate(samples, pad_id=0, seq_length=L + 1)
        hidden = torch.randn(B, L + 1, D, generator=g) * 0.3
        cases.append((hidden, b["targets"], b["loss_mask"]))
    return cases


def dense_reference(weight, cases):
    """phi = log p_y + H (DESIGN.md section 2) of the loss tokens only, from a float64 log-softmax
    of the whole vocabulary, and their -log p_y."""
    phi, nll = [], []
    for hidden, targets, mask in cases:
        logp = (hidden.double() @ weight.double().T).log_softmax(-1)
        keep = mask > 0
        lp = logp[keep]
        y = targets[keep]
        assert (y >= 0).all()
        logp_y = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        phi.append(logp_y - (lp.exp() * lp).sum(-1))
        nll.append(-logp_y)
    return torch.cat(phi), torch.cat(nll)


@pytest.mark.parametrize("fused", [False, True])
def test_recorded_sums_count_loss_tokens_only(fused):
    """The count of phi < -1, the phi sums and the token count cover the loss tokens and nothing
    else, also where the masked positions have real targets (the unfused head sees them all)."""
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(9))
    cases = collated_cases()
    prompt = torch.cat([((m == 0) & (t >= 0)).flatten() for _, t, m in cases])
    assert prompt.sum() > 10  # real targets the loss must not count
    phi, nll = dense_reference(weight, cases)
    _, _, _, sums, kept, _ = run(fused, "ce", weight, cases)
    s = dict(zip(SUMS, sums.tolist()))
    assert s["tokens"] == phi.numel() == 2 * 12
    lt = int((phi < -1).sum())
    assert 0 < lt < phi.numel()
    assert s["phi_lt_-1"] == lt
    assert s["phi"] == pytest.approx(phi.sum().item(), rel=1e-4, abs=1e-4)
    assert s["phi_sq"] == pytest.approx((phi * phi).sum().item(), rel=1e-4)
    assert s["loss_ce"] == pytest.approx(nll.sum().item(), rel=1e-4)
    torch.testing.assert_close(kept.double(), phi, rtol=1e-4, atol=1e-4)


def test_token_summary_is_the_population_statistics_of_phi():
    """metrics.token_summary turns the sums into the record: phi_mean, phi_std (population,
    correction 0, of the loss tokens' phi), the fraction with phi < -1 and the mean loss."""
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(9))
    cases = collated_cases()
    phi, nll = dense_reference(weight, cases)
    assert abs(phi.mean()) > 0.3 * phi.std()  # a mean that matters to the std
    _, _, _, sums, _, _ = run(False, "ce", weight, cases)
    rec = token_summary(dict(zip(SUMS, sums.tolist())), "ce")
    assert rec["phi_mean"] == pytest.approx(phi.mean().item(), rel=1e-4)
    assert rec["phi_std"] == pytest.approx(torch.std(phi, correction=0).item(), rel=1e-4)
    assert rec["frac_phi_lt_-1"] == pytest.approx((phi < -1).double().mean().item(), rel=1e-12)
    assert rec["loss"] == rec["loss_ce"] == pytest.approx(nll.mean().item(), rel=1e-4)
    assert rec["gamma_mean"] == 0.0  # ce: w = p_y ** 0
    # By hand, for what ce leaves at 0: 3 tokens, the mean of the trained loss (dft) and of gamma.
    sums = {"loss_ce": 6.0, "loss_dft": 3.0, "loss_idft": 1.5, "loss_eaft": 0.6, "tokens": 3.0, "phi": -3.0,
            "phi_sq": 5.0, "gamma": 1.5, "phi_lt_-1": 1.0}
    assert sums.keys() == set(SUMS)
    assert token_summary(sums, "dft") == {"loss": 1.0, "phi_mean": -1.0, "phi_std": pytest.approx((2 / 3) ** 0.5),
                                          "gamma_mean": 0.5, "frac_phi_lt_-1": pytest.approx(1 / 3), "loss_ce": 2.0,
                                          "loss_dft": 1.0, "loss_idft": 0.5, "loss_eaft": pytest.approx(0.2)}

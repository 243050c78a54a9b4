"""Vocab-parallel DDT statistics and ce / dft / idft / eaft losses vs a dense single-process reference."""
import math
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_onpolicy.ddt import (IDFTConfig, TokenStats, ddt_loss, idft_lambda, token_weights,
                                   vocab_parallel_stats)
from tests.dist_utils import run_distributed

SHAPE = (3, 5)  # [batch, seq]
LOSSES = [("ce", 1.0), ("dft", 1.0), ("idft", 1.0), ("idft", 0.5), ("eaft", 1.0)]
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce", "all_to_all", "all_to_all_single",
               "gather", "scatter")


def make_case(vocab, padded, seed=0):
    """Logits [*SHAPE, padded] with a spread and garbage padding; -100 at masked targets."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*SHAPE, padded, generator=g) * 3
    spike = torch.rand(*SHAPE, padded, generator=g) < 0.1
    logits = torch.where(spike, logits * 15, logits)  # some |z| up to ~100
    garbage = torch.tensor([1e30, float("nan"), -1e30, float("inf")])
    logits[..., vocab:] = garbage[: padded - vocab]
    mask = (torch.rand(SHAPE, generator=g) < 0.7).float()
    mask[0, 0], mask[-1, -1] = 0.0, 1.0
    targets = torch.randint(0, vocab, SHAPE, generator=g).masked_fill(mask == 0, -100)
    return logits, targets, mask


def dense_reference(logits, targets, mask, vocab, kind, denom, lam, cfg=IDFTConfig()):
    """Plain log_softmax over the unpadded vocab in fp64, weights written out from DESIGN.md."""
    z = logits[..., :vocab].double().requires_grad_()
    logq = torch.log_softmax(z, -1)
    q = logq.exp()
    logp = logq.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(q * logq).sum(-1)
    var = (q * logq ** 2).sum(-1) - entropy ** 2
    phi = logp + entropy
    p_y = logp.exp()
    if kind == "ce":
        w = torch.ones_like(p_y)
    elif kind == "dft":
        w = p_y
    elif kind == "eaft":  # normalized by the true vocab size, not the padded width
        w = entropy / math.log(vocab)
    else:
        g_raw = torch.exp(-phi / cfg.beta).clamp(cfg.gamma_min, cfg.gamma_max)
        w = p_y ** (1 + lam * (g_raw - 1))
    loss = -(mask * w.detach() * logp).sum() / denom
    (grad,) = torch.autograd.grad(loss, z)
    grad = F.pad(grad, (0, logits.shape[-1] - vocab))  # padded columns: no gradient
    return dict(logp=logp.detach(), entropy=entropy.detach(), phi=phi.detach(), var=var.detach(),
                loss=loss.detach(), grad=grad)


@contextmanager
def count_collectives():
    """Record the name of every torch.distributed collective called inside the block."""
    calls = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


def check_against_dense(vocab, padded, group):
    """All checks for one TP group: stats, losses, gradients, collectives, dtypes, no in-place."""
    tp = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    n_collectives = 0 if group is None else 2
    shard = padded // tp
    cols = slice(rank * shard, (rank + 1) * shard)
    full, targets, mask = make_case(vocab, padded)
    keep = mask.bool()
    # The caller's denominator is the global batch's token count, not this micro-batch's mask sum.
    denoms = {"ce": float(mask.sum()) + 3, "dft": 7.0, "idft": torch.tensor(float(mask.sum()) + 1),
              "eaft": 5.0}

    for dtype in (torch.float32, torch.bfloat16):
        logits = full.to(dtype)  # the reference sees the same (bf16-rounded) values
        x = logits[..., cols].clone()
        before = bits(x)
        with count_collectives() as calls:
            stats = vocab_parallel_stats(x, targets, group, vocab)
        assert calls == ["all_reduce"] * n_collectives, calls
        ref = dense_reference(logits, targets, mask, vocab, "ce", 1.0, 1.0)
        for name in ("logp", "phi"):  # masked positions have no real target
            close(getattr(stats, name)[keep], ref[name][keep], what=f"{dtype} {name}")
        for name in ("entropy", "var"):
            close(getattr(stats, name), ref[name], what=f"{dtype} {name}")
        for name in ("logp", "entropy", "phi", "var", "max_logit", "log_sum_exp"):
            value = getattr(stats, name)
            assert value.dtype == torch.float32 and value.shape == targets.shape, name
            assert torch.isfinite(value).all() and not value.requires_grad, name

        for kind, lam in LOSSES:
            xg = x.clone().requires_grad_()
            with count_collectives() as calls:
                loss, _, w, gamma = ddt_loss(xg, targets, mask, kind, denoms[kind], group, vocab,
                                             lam)
            assert calls == ["all_reduce"] * n_collectives, (kind, calls)
            with count_collectives() as calls:
                loss.backward()
            assert calls == [], (kind, calls)
            ref = dense_reference(logits, targets, mask, vocab, kind, denoms[kind], lam)
            what = f"TP={tp} {dtype} {kind} lam={lam}"
            assert loss.dtype == torch.float32 and loss.dim() == 0, what
            close(loss, ref["loss"], what=what + " loss")
            assert xg.grad.dtype == dtype, what
            # bf16 gradients carry one bf16 rounding of an fp32-exact value.
            grad_tol = (dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32
                        else dict(atol=1e-6, rtol=8e-3))
            close(xg.grad, ref["grad"][..., cols], what=what + " grad", **grad_tol)
            assert w.dtype == gamma.dtype == torch.float32 and not w.requires_grad, what
            if group is not None:  # every TP rank reports the very same loss
                losses = [torch.zeros(()) for _ in range(tp)]
                dist.all_gather(losses, loss.detach(), group=group)
                assert all(torch.equal(v, losses[0]) for v in losses), (what, losses)
        assert torch.equal(bits(x), before), f"{dtype}: input logits modified in place"


def check_banned_tokens(vocab, padded, group):
    """Real columns at -inf (banned tokens): the statistics, losses and gradients are those of the
    softmax over the other columns, finite, and no gradient reaches the banned columns."""
    tp = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    shard = padded // tp
    cols = slice(rank * shard, (rank + 1) * shard)
    full, targets, mask = make_case(vocab, padded)
    # columns no target uses: the first from every tenth column on (a TP 4 shard is 10 wide) at every
    # position, and at one position every such column of the first half of the vocabulary
    banned = torch.zeros(*SHAPE, padded, dtype=torch.bool)
    free = [c for c in range(vocab) if c not in targets.flatten().tolist()]
    for start in range(0, vocab, 10):
        banned[..., next(c for c in free if c >= start)] = True
    banned[1, 2, [c for c in free if c < vocab // 2]] = True
    full = full.masked_fill(banned, float("-inf"))
    # the reference: each position's softmax over its own unbanned columns, targets renumbered
    ref = {k: torch.zeros(SHAPE, dtype=torch.float64) for k in ("logp", "entropy", "phi", "var")}
    keep = mask.bool()
    for dtype in (torch.float32, torch.bfloat16):
        logits = full.to(dtype)
        stats = vocab_parallel_stats(logits[..., cols].clone(), targets, group, vocab)
        for kind, lam in LOSSES:
            xg = logits[..., cols].clone().requires_grad_()
            loss, _, _, _ = ddt_loss(xg, targets, mask, kind, 7.0, group, vocab, lam)
            loss.backward()
            ref_loss, ref_grad = torch.zeros((), dtype=torch.float64), torch.zeros(*SHAPE, padded, dtype=torch.float64)
            for b in range(SHAPE[0]):
                for t in range(SHAPE[1]):
                    kept = [c for c in range(vocab) if not banned[b, t, c]]
                    new = torch.tensor([kept.index(int(targets[b, t])) if targets[b, t] >= 0 else -100])
                    one = dense_reference(logits[b, t, kept].view(1, 1, -1), new.view(1, 1), mask[b, t].view(1, 1),
                                          len(kept), kind, 7.0, lam)
                    # eaft divides H by the log of the true vocab size, banned columns included; w is detached,
                    # so the loss and gradient are linear in it
                    scale = math.log(len(kept)) / math.log(vocab) if kind == "eaft" else 1.0
                    ref_loss += scale * one["loss"]
                    ref_grad[b, t, kept] = scale * one["grad"][0, 0]
                    for name in ref:
                        ref[name][b, t] = one[name][0, 0]
            what = f"TP={tp} {dtype} {kind} lam={lam} banned"
            assert torch.isfinite(loss) and torch.isfinite(xg.grad).all(), what
            close(loss, ref_loss, what=what + " loss")
            close(xg.grad, ref_grad[..., cols], what=what + " grad",
                  **(dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-6, rtol=8e-3)))
            assert (xg.grad[banned[..., cols]] == 0).all(), what
        for name in ("logp", "phi"):  # masked positions have no real target
            close(getattr(stats, name)[keep], ref[name][keep], what=f"TP={tp} {dtype} {name} banned")
        for name in ("entropy", "var"):
            assert torch.isfinite(getattr(stats, name)).all(), name
            close(getattr(stats, name), ref[name], what=f"TP={tp} {dtype} {name} banned")


def test_single_process_matches_dense():
    check_against_dense(37, 40, None)  # padding also on a single rank
    check_banned_tokens(37, 40, None)


def _tp_worker(rank, world_size):
    # TP=4 over the world: V=37 padded to 40 (last shard 7 real columns) and V=5 padded to 8
    # (shard 2: one rank half padding, one rank all padding).
    check_against_dense(37, 40, dist.group.WORLD)
    check_against_dense(5, 8, dist.group.WORLD)
    # TP=2 in two groups {0,1} and {2,3}: ranks 2 and 3 must use their group rank, not the global.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    check_against_dense(37, 40, pairs[rank // 2])
    check_banned_tokens(37, 40, dist.group.WORLD)
    check_banned_tokens(37, 40, pairs[rank // 2])


def test_tp2_and_tp4_match_dense():
    run_distributed(_tp_worker, 4)


def test_idft_lambda_schedule():
    assert idft_lambda(0.0, 0.0, 0.0) == 1.0  # defaults: IDFT from the first step
    assert idft_lambda(0.05, 0.1, 0.2) == 0.0
    assert idft_lambda(0.1, 0.1, 0.2) == 0.0
    assert idft_lambda(0.2, 0.1, 0.2) == pytest.approx(0.5)
    assert idft_lambda(0.3, 0.1, 0.2) == pytest.approx(1.0)
    assert idft_lambda(0.9, 0.1, 0.2) == 1.0
    assert idft_lambda(0.099, 0.1, 0.0) == 0.0  # no transition: a step at the end of warmup
    assert idft_lambda(0.1, 0.1, 0.0) == 1.0


def _stats(logp, phi):
    zeros = torch.zeros_like(logp)
    return TokenStats(logp=logp, entropy=phi - logp, phi=phi, var=zeros, max_logit=zeros,
                      log_sum_exp=zeros)


def test_token_weights():
    phi = torch.tensor([-10.0, -0.5, 0.0, 0.5, 10.0])
    logp = torch.tensor([-3.0, -1.0, -0.5, -0.2, -0.01])
    stats = _stats(logp, phi)
    cfg = IDFTConfig()

    w, gamma = token_weights("ce", stats, 1.0, cfg, 64)
    assert torch.equal(w, torch.ones(5)) and torch.equal(gamma, torch.zeros(5))
    w, gamma = token_weights("dft", stats, 1.0, cfg, 64)
    close(w, logp.exp()), close(gamma, torch.ones(5))

    # exp(10) and exp(-10) are clamped to gamma_max = 2 and gamma_min = 0.1.
    g_raw = torch.tensor([2.0, math.exp(0.5), 1.0, math.exp(-0.5), 0.1])
    for lam in (1.0, 0.5, 0.0):
        w, gamma = token_weights("idft", stats, lam, cfg, 64)
        close(gamma, 1 + lam * (g_raw - 1), what=f"lam={lam}")
        close(w, logp.exp() ** gamma, what=f"lam={lam}")
    cfg = IDFTConfig(beta=2.0, gamma_min=0.5, gamma_max=1.5)
    _, gamma = token_weights("idft", stats, 1.0, cfg, 64)
    close(gamma, torch.tensor([1.5, math.exp(0.25), 1.0, math.exp(-0.25), 0.5]))

    # eaft: H / log V, V the true vocab size; no exponent of p_y.
    w, gamma = token_weights("eaft", stats, 1.0, cfg, 64)
    close(w, (phi - logp) / math.log(64)), close(gamma, torch.zeros(5))

    with pytest.raises(ValueError):
        token_weights("xent", stats, 1.0, cfg, 64)
    logits = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError):
        ddt_loss(logits, torch.tensor([0, 1]), torch.ones(2), "xent", 2.0)


def test_on_policy_phi_is_centered():
    """E[phi] = 0 and sum phi / sqrt(sum var) ~ N(0, 1) for targets sampled from the model."""
    n_seq, seq_len, vocab = 400, 50, 64
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n_seq, seq_len, vocab, generator=g) * 2.5
    probs = torch.softmax(logits, -1).view(-1, vocab)
    targets = torch.multinomial(probs, 1, generator=g).view(n_seq, seq_len)
    stats = vocab_parallel_stats(logits, targets)

    std_err = stats.var.sum().sqrt() / stats.var.numel()  # Var(phi_t) = var_t under the model
    assert abs(stats.phi.mean()) < 4 * std_err, (stats.phi.mean(), std_err)
    z = stats.phi.sum(-1) / stats.var.sum(-1).sqrt()
    assert abs(z.mean()) < 4 / math.sqrt(n_seq), z.mean()
    assert 0.85 < z.std() < 1.15, z.std()
    assert 0.9 < (z.abs() < 1.96).float().mean() < 0.99

    # Off-policy (uniform) targets: phi is clearly negative on average.
    uniform = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    assert vocab_parallel_stats(logits, uniform).phi.mean() < -50 * std_err

#!/usr/bin/env python
"""Vocab-parallel IDFT loss (custom autograd, fp32 statistics, no collective in backward) against
the plain dense formulation (log_softmax over the full vocabulary + autograd), side by side in
one process: forward+backward time and the ratio. TP=1 here; the TP>1 path adds two all-reduces
of [tokens] and [tokens, 4] floats, independent of the vocabulary size.

    .venv/bin/python bench/bench_ddt_loss.py [--tokens 1024] [--vocab 49152] [--repeats 5]"""
import argparse
import time

import torch

from megatron_onpolicy.ddt import IDFTConfig, ddt_loss


def dense_idft(logits, targets, mask, denom, cfg=IDFTConfig()):
    logp_all = torch.log_softmax(logits.float(), -1)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    phi = (logp + entropy).detach()
    gamma = torch.exp(-phi / cfg.beta).clamp(cfg.gamma_min, cfg.gamma_max)
    w = torch.exp(gamma * logp.detach())
    return -(w * logp * mask).sum() / denom


def ours(logits, targets, mask, denom):
    return ddt_loss(logits, targets, mask, "idft", denom)[0]


def timed(fn, logits, targets, mask, repeats):
    best = float("inf")
    for _ in range(repeats):
        x = logits.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        fn(x, targets, mask, mask.sum()).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, x.grad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    logits = (torch.randn(args.tokens, args.vocab, device=device) * 3).to(dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    mask = (torch.rand(args.tokens, device=device) < 0.8).float()
    t_dense, g_dense = timed(dense_idft, logits, targets, mask, args.repeats)
    t_ours, g_ours = timed(ours, logits, targets, mask, args.repeats)
    err = (g_ours.float() - g_dense.float()).abs().max().item()
    print(f"device={device} dtype={args.dtype} tokens={args.tokens} vocab={args.vocab}")
    print(f"dense log_softmax+autograd  fwd+bwd {t_dense * 1e3:8.1f} ms")
    print(f"vocab-parallel ddt_loss     fwd+bwd {t_ours * 1e3:8.1f} ms")
    print(f"speed-up (dense / ours)     {t_dense / t_ours:8.2f}x   max |grad diff| {err:.2e}")


if __name__ == "__main__":
    main()

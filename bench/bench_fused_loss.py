#!/usr/bin/env python
"""The loss path from final hidden states h [N, D] and the head weight W [V, D], forward + backward
(gradients of h and W), one fresh subprocess per case so that each peak memory is its own:

  naive     (a) the reference code's way: logits, softmax, log_softmax, entropy and cross-entropy
                each over the full [N, V] logits, IDFT weights, autograd
  unfused   (b) ours before fusion: F.linear, then ddt_loss (vocab-parallel stats + custom backward)
  fused     (c) ours fused: ddt/fused.py, chunked over tokens, IDFT (fused-ce: plain CE); at TP = 1
                one pass, both gradients formed in the forward (three matmuls); a chunk's sums in
                one compiled kernel, compiled before the clock starts (fused-eager: eager torch ops)
  fused-tp  the two passes a TP rank runs (statistics, then a backward that rebuilds each chunk's
                logits and forms its logit gradient in a compiled kernel), here at TP = 1 without
                the collectives, IDFT (fused-tp-eager: eager torch ops); these two only with --cases
  torch-lce (d) torch.nn.functional.linear_cross_entropy with its chunked options (plain CE only)
  floor     (e) the three matmuls alone: h @ W^T, then dh = G @ W and dW = G^T @ h

Prints wall time and peak memory (CPU: peak RSS above the RSS once the inputs exist; GPU:
torch.cuda.max_memory_allocated above the inputs) and the ratios measured side by side. On a GPU
the cases run in one process (the allocator's peak is reset per case), each after one untimed
warm-up, and a case that runs out of memory is reported as not fitting.

    .venv/bin/python bench/bench_fused_loss.py [--tokens 2048 4096] [--vocab 49152 151936] [--dim 576] \
        [--dtype fp32|bf16] [--repeat R] [--chunk-size C]

--chunk-sums times a chunk's elementwise work alone, after the logits' matmul, compiled against
eager, in one process, the rounds interleaved: its max, exp and three sums, and the two-pass
backward's logit gradient (in --dtype: bf16 is the copy bf16 matmuls take); one chunk of 192 rows
(--chunk-size) per vocabulary size.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_onpolicy.ddt import IDFTConfig, ddt_loss, fused, fused_ddt_loss, token_weights  # noqa: E402
from cases import case_in_subprocess, memory_mark, peak_since  # noqa: E402 (bench/cases.py)

CASES = ("floor", "naive", "unfused", "fused", "fused-ce", "fused-eager", "fused-tp", "fused-tp-eager", "torch-lce")


def naive(h, w, y, mask, denom, cfg=IDFTConfig()):
    logits = h @ w.t()
    probs = torch.softmax(logits, -1)
    logprobs = torch.log_softmax(logits, -1)
    entropy = -(probs * logprobs).sum(-1)
    ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
    phi = (entropy - ce).detach()
    gamma = torch.exp(-phi / cfg.beta).clamp(cfg.gamma_min, cfg.gamma_max)
    weight = torch.exp(-gamma * ce.detach())
    return (weight * ce * mask).sum() / denom


def run_case(case, n, v, d, threads, dtype="fp32", repeat=1, chunk=None):
    """-> the best wall time of `repeat` runs (after a warm-up on a GPU) and the peak memory."""
    torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(n, d, device=dev, generator=g).to(dt).requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=g) / d ** 0.5).to(dt).requires_grad_()
    mask = (torch.rand(n, device=dev, generator=g) < 0.9).float()
    y = torch.randint(0, v, (n,), device=dev, generator=g).masked_fill(mask == 0, -100)
    denom = float(mask.sum())
    fused.set_kernels("eager" if case.endswith("-eager") else "compiled")
    if case in ("fused", "fused-ce", "fused-tp"):  # compile the kernels' graphs for this width (rows are dynamic)
        one_pass(case, h[:2].detach().requires_grad_(), w.detach(), y[:2], mask[:2], 1.0, None)
    base = memory_mark()
    times = []
    for _ in range(repeat + (dev.type == "cuda")):  # the first on a GPU: kernel selection, allocator
        h.grad = w.grad = None
        start = time.perf_counter()
        one_pass(case, h, w, y, mask, denom, chunk)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times[-repeat:]), "peak_gb": peak_since(base) / 1e9, "device": str(dev)}


def one_pass(case, h, w, y, mask, denom, chunk):
    if case == "floor":
        with torch.no_grad():
            z = h @ w.t()
            z @ w, z.t() @ h
        return
    if case == "naive":
        loss = naive(h, w, y, mask, denom)
    elif case == "unfused":
        loss = ddt_loss(F.linear(h, w), y, mask, "idft", denom)[0]
    elif case in ("fused", "fused-ce", "fused-eager"):
        loss = fused_ddt_loss(h, w, y, mask, "ce" if case == "fused-ce" else "idft", denom, chunk_size=chunk)[0]
    elif case in ("fused-tp", "fused-tp-eager"):
        loss = fused._two_pass(h, w, y, mask, denom, None, None, chunk,
                               lambda stats: token_weights("idft", stats, 1.0, IDFTConfig(), w.shape[0]))[0]
    elif case == "torch-lce":
        options = torch.nn.LinearCrossEntropyOptions()  # the chunked path, its own auto settings
        loss = F.linear_cross_entropy(h, w, y, reduction="sum", options=options) / denom
    loss.backward()


def chunk_sums(vocabs, rows, threads, repeat, dtype):
    """Median ms of a chunk's two elementwise kernels on one [rows, V] chunk of logits, compiled and
    eager: `_chunk_partials`' sums, and the two-pass backward's logit gradient in dtype."""
    torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    print(f"torch {torch.__version__}, {dev}, {threads} threads, one chunk of {rows} rows, median of {repeat}")
    for v in vocabs:
        g = torch.Generator(device=dev).manual_seed(0)
        logits = torch.randn(rows, v, device=dev, generator=g) * 3
        index = torch.randint(0, v, (rows,), device=dev, generator=g)
        log_z = torch.logsumexp(logits, -1)
        ones, scale = torch.ones(rows, device=dev), torch.rand(rows, device=dev, generator=g)
        d, e, scratch = (torch.empty_like(logits) for _ in range(3))
        grad = torch.empty_like(logits, dtype=dt)

        def sums(compiled):
            fused._chunk_partials(d, index, e, scratch, compiled)

        def logit_grad(compiled):
            if compiled:
                return fused._compiled(fused._logit_grad)(d, log_z, index, ones, scale, grad)
            # the backward's eager ops: in place, then (bf16) the rounded copy with the row factor
            d.sub_(log_z.unsqueeze(-1)).exp_().scatter_add_(-1, index.unsqueeze(-1), -ones.unsqueeze(-1))
            if dt != torch.float32:
                torch.mul(d, scale.unsqueeze(-1), out=grad)

        for name, work in (("sums", sums), (f"logit gradient ({dtype})", logit_grad)):
            times = {"compiled": [], "eager": []}
            for i in range(repeat + 1):  # the first round compiles
                for kernel in times:
                    d.copy_(logits)  # the eager kernels work on d in place
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    work(kernel == "compiled")
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    if i:
                        times[kernel].append(time.perf_counter() - start)
            med = {k: sorted(t)[len(t) // 2] * 1e3 for k, t in times.items()}
            print(f"  V={v} {name}: compiled {med['compiled']:.1f} ms, eager {med['eager']:.1f} ms, "
                  f"eager / compiled {med['eager'] / med['compiled']:.2f}")


def gpu_case(case, n, v, d, dtype, repeat, chunk):
    """One case in this process (GPU): None, after saying so, where it does not fit or fails."""
    try:
        return run_case(case, n, v, d, 1, dtype, repeat, chunk)
    except (torch.OutOfMemoryError, AttributeError, RuntimeError) as e:  # AttributeError: no torch-lce
        print(f"N={n} V={v} D={d} {case}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return None
    finally:
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--dim", type=int, nargs="+", default=[576])
    p.add_argument("--cases", nargs="+", default=[c for c in CASES if not c.startswith("fused-tp")], choices=CASES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of h and W (fp32 accumulation)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each case; the best is shown")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk of the fused cases (default: ddt/fused.py's rule)")
    p.add_argument("--chunk-sums", action="store_true", help="time the chunk kernels alone, compiled and eager")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.chunk_sums:
        chunk_sums(args.vocab, args.chunk_size or 192, args.threads, args.repeat, args.dtype)
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens[0], args.vocab[0], args.dim[0], args.threads,
                                  args.dtype, args.repeat, args.chunk_size)))
        return
    gpu = torch.cuda.is_available()
    where = torch.cuda.get_device_name() if gpu else f"{args.threads} threads, one process per case"
    chunks = f"chunks of {args.chunk_size} tokens" if args.chunk_size else "chunks by ddt/fused.py's rule"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, TP = 1, best of {args.repeat}, {chunks}")
    for d in args.dim:
        for v in args.vocab:
            for n in args.tokens:
                res = {}
                for case in args.cases:
                    r = gpu_case(case, n, v, d, args.dtype, args.repeat, args.chunk_size) if gpu else \
                        case_in_subprocess(__file__, f"N={n} V={v} D={d} {case}",
                                           ["--case", case, "--tokens", n, "--vocab", v, "--dim", d,
                                            "--threads", args.threads, "--dtype", args.dtype, "--repeat", args.repeat,
                                            *(["--chunk-size", args.chunk_size] if args.chunk_size else [])])
                    if r is not None:
                        res[case] = r
                if not res:  # every case failed (each said why): on to the next shape
                    continue
                print(f"\nN={n} V={v} D={d} ({next(iter(res.values()))['device']})")
                print(f"  {'case':10s} {'time s':>8s} {'x floor':>8s} {'peak GB':>8s} {'x naive':>8s}")
                for case, r in res.items():
                    floor = res.get("floor", r)["seconds"]
                    mem = res.get("naive", r)["peak_gb"]
                    print(f"  {case:10s} {r['seconds']:8.2f} {r['seconds'] / floor:8.2f} {r['peak_gb']:8.2f} "
                          f"{r['peak_gb'] / mem:8.3f}")
                if "fused" in res and "fused-ce" in res:
                    print(f"  fused IDFT / fused CE time: {res['fused']['seconds'] / res['fused-ce']['seconds']:.3f}")


if __name__ == "__main__":
    main()

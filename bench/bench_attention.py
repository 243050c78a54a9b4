#!/usr/bin/env python
"""Attention of one packed row, forward + backward (gradients of q, k, v), SmolLM2-135M's heads
(9 query / 3 KV heads of 64), one fresh subprocess per case so that each peak memory is its own:

  causal       SDPA is_causal over the whole row, as if it were one sample (not exact for a packed row)
  mask         today's path before model/attention.py: a boolean [1, 1, L, L] mask from the segment ids
  spans        model/attention.py's CPU path: one is_causal SDPA call per sample
  mask-window  the mask path with a sliding window (--window) inside the samples as well
  spans-window the same: samples longer than the window in query blocks with a band mask
  flex, flex-window   (GPU only) model/attention.py's flex backend (--attention-backend flex): one
               compiled torch.nn.attention.flex_attention call on a document + causal (+ window)
               block mask

Building the mask or the spans from the segment ids is timed, as each forward does it; the block
mask is cached by the spans (a model builds it once a batch for all its layers). Prints
the best wall time of --repeat runs, the peak memory above that once q, k, v exist (CPU: RSS;
GPU: torch.cuda.max_memory_allocated, --dtype there too) and ratios.

    .venv/bin/python bench/bench_attention.py [--length 4096] [--samples 8] [--window 256]

--train SEQ ...: instead, one iteration of launch/pretrain_idft.py on smollm2-135m with --pack,
micro-batch 1, fp32, per --seq-length, and its peak RSS (`--tree DIR` runs another checkout):

    .venv/bin/python bench/bench_attention.py --train 1024 2048 4096

--saved SEQ ...: what autograd keeps for the backward of one decoder layer of smollm2-135m on a
packed row (samples of about 64 tokens, as --pack makes of data/math_train.jsonl), counted by
storage through saved_tensors_hooks, for the mask path and the spans path:

    .venv/bin/python bench/bench_attention.py --saved 2048 4096
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_onpolicy.model import attention  # noqa: E402
from megatron_onpolicy.model.attention import attend, packed_spans  # noqa: E402
from cases import case_in_subprocess, memory_mark, peak_since, status_kb  # noqa: E402 (bench/cases.py)

CASES = ("causal", "mask", "spans", "mask-window", "spans-window", "flex", "flex-window")
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def sample_lengths(length, samples, seed=0):
    """`samples` random lengths (at least 16) that fill the row exactly."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(length // 16 - 1, generator=g)[:samples - 1].add(1).mul(16).tolist())
    return [e - s for s, e in zip([0] + cuts, cuts + [length])]


def mask_path(seg, window):
    """The boolean [B, 1, L, L] mask the model built for packed rows before model/attention.py."""
    idx = torch.arange(seg.shape[1], device=seg.device)
    mask = (idx[None, :] <= idx[:, None]) & (seg[:, :, None] == seg[:, None, :])
    return (mask & (idx[None, :] > idx[:, None] - window) if window is not None else mask).unsqueeze(1)


def run_case(case, length, samples, window, repeat, threads, dtype):
    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    dev, dt = ("cuda" if gpu else "cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    lengths = sample_lengths(length, samples)
    seg = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])[None].to(dev)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=g).to(dev, dt).requires_grad_()
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g).to(dev, dt).requires_grad_() for _ in range(2))
    w = window if case.endswith("window") else None
    attention.set_backend("flex" if case.startswith("flex") else "sdpa")
    base = memory_mark()
    times = []
    for _ in range(repeat + gpu):  # the first on a GPU is a warm-up (kernel selection)
        start = time.perf_counter()
        if case == "causal":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif case.startswith("mask"):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_path(seg, w), enable_gqa=True)
        else:
            out = attend(q, k, v, packed_spans(seg).with_window(w), gqa=True)
        out.sum().backward()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
        del out
    return {"seconds": min(times[-repeat:]), "peak_gb": peak_since(base) / 1e9, "lengths": lengths,
            "device": torch.cuda.get_device_name() if gpu else f"{threads} threads"}


def attention_table(args):
    res = {}
    for case in args.cases:
        r = case_in_subprocess(__file__, case, ["--case", case, "--length", args.length, "--samples", args.samples,
                                                "--window", args.window, "--repeat", args.repeat,
                                                "--threads", args.threads, "--dtype", args.dtype])
        if r is not None:
            res[case] = r
    if not res:  # every case failed, each saying why
        return
    first = next(iter(res.values()))
    print(f"torch {torch.__version__}, {first['device']}, {args.dtype}, one packed row of {args.length} tokens, "
          f"{args.samples} samples, window {args.window}, best of {args.repeat}, one process per case")
    print(f"sample lengths {first['lengths']}")
    print(f"  {'case':13s} {'time s':>8s} {'peak GB':>8s}")
    for case, r in res.items():
        print(f"  {case:13s} {r['seconds']:8.3f} {r['peak_gb']:8.3f}")
    for new, old in (("spans", "mask"), ("spans-window", "mask-window"), ("spans", "flex"),
                     ("spans-window", "flex-window")):
        if new in res and old in res:
            print(f"  {old} / {new}: time {res[old]['seconds'] / res[new]['seconds']:.2f}x, "
                  f"peak memory {res[old]['peak_gb'] / max(res[new]['peak_gb'], 1e-3):.1f}x")


def train_table(args):
    """One --pack training iteration per sequence length, each in a fresh process (--phases)."""
    tree = os.path.abspath(args.tree or ROOT)
    print(f"launch/pretrain_idft.py of {tree}: smollm2-135m, --pack, micro-batch 1, one iteration, fp32, "
          f"{args.threads} threads; peak RSS (GB) while each call of train() ran")
    for seq in args.train:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--phases", str(seq), "--tree", tree,
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            print(f"  {seq}: failed: {out.stderr.strip().splitlines()[-3:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  --seq-length {seq}: peak {r.pop('peak'):.2f} GB, {time.perf_counter() - start:.0f} s; "
              + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))


def run_phases(seq, tree, threads):
    """Run the trainer in this process while a thread samples the RSS every 20 ms and files it under
    the function that train() (train/loop.py) is in at that moment: where the peak comes from."""
    import runpy
    import threading

    main, peaks, done = threading.main_thread().ident, {}, threading.Event()

    def sample():
        while not done.is_set():
            stack, f = [], sys._current_frames().get(main)
            while f is not None:
                if f.f_code.co_name not in ("wrapped_fn", "_wrapped_call_impl", "_call_impl"):  # wrappers
                    stack.append(f.f_code.co_name)
                if f.f_code.co_name == "train" and f.f_code.co_filename.endswith(os.path.join("train", "loop.py")):
                    break
                f = f.f_back
            # the call of train() running now, and within train_step its forward / backward / step
            phase = "start-up" if f is None else stack[-2] if len(stack) > 1 else "train"
            if phase == "train_step" and len(stack) > 2:
                phase += ":" + stack[-3]
            peaks[phase] = max(peaks.get(phase, 0), status_kb("VmRSS") * 1024 / 1e9)
            time.sleep(0.02)

    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = [os.path.join(tree, "launch", "pretrain_idft.py"), "--model", "smollm2-135m",
                    "--train-data", os.path.join(ROOT, "data", "math_train.jsonl"), "--pack", "--seq-length", str(seq),
                    "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-5",
                    "--save", tmp, "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero1_fp32.json")]
        sys.path[0] = tree
        for name in [m for m in sys.modules if m.startswith("megatron_onpolicy")]:
            del sys.modules[name]  # the checkout under test, not this one
        os.environ["OMP_NUM_THREADS"] = str(threads)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with contextlib.redirect_stdout(sys.stderr):
            runpy.run_path(sys.argv[0], run_name="__main__")
        done.set()
        sampler.join()
    print(json.dumps({"peak": status_kb("VmHWM") * 1024 / 1e9, **peaks}))


def saved_table(args):
    from collections import Counter

    from megatron_onpolicy.model.llama import layer_masks
    from megatron_onpolicy.model.loader import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved too, but not activations
    seen, by_shape = set(), Counter()

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            by_shape[tuple(t.shape)] += t.untyped_storage().nbytes()
        return t

    print("smollm2-135m, autograd's saved tensors per decoder layer (fp32), one packed row")
    print(f"  {'seq':>6s} {'path':6s} {'MB/layer':>9s}  largest saved tensors (MB/layer by shape)")
    for seq in args.saved:
        lengths = sample_lengths(seq, seq // 64)
        seg = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])[None]
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        ids = torch.randint(0, model.cfg.vocab_size, (1, seq))
        for path, masks in (("mask", [mask_path(seg, None)] * 2),
                            ("spans", layer_masks(model.cfg, pos, seg))):

            per_layer = []
            for n in (1, 2):  # one layer's share: two layers less one (the embedding output counts once)
                seen.clear(), seen.update(weights), by_shape.clear()
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                    out = _forward_layers(model, ids, pos, masks, n)
                per_layer.append((sum(by_shape.values()), Counter(by_shape)))
                del out
            total = per_layer[1][0] - per_layer[0][0]
            top = (per_layer[1][1] - per_layer[0][1]).most_common(4)
            print(f"  {seq:6d} {path:6s} {total / 1e6:9.1f}  " + ", ".join(f"{list(k)} {b / 1e6:.0f}" for k, b in top))


def _forward_layers(model, ids, pos, masks, n):
    """The first n decoder layers of the model on a packed row, parameters trainable."""
    x = model.embed(ids)
    cos, sin = model.rotary(pos, x.dtype)
    for layer, mask in zip(model.layers[:n], masks):
        x = layer(x, cos, sin, mask)
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cases", nargs="+", choices=CASES,
                   default=list(CASES if torch.cuda.is_available() else CASES[:-2]))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of q, k, v (the attention table)")
    p.add_argument("--train", type=int, nargs="+", metavar="SEQ", help="seq lengths of --pack training runs instead")
    p.add_argument("--saved", type=int, nargs="+", metavar="SEQ", help="saved-activation table instead")
    p.add_argument("--tree", help="with --train: the checkout whose launch/pretrain_idft.py runs (default: this one)")
    p.add_argument("--phases", type=int, help=argparse.SUPPRESS)  # internal: one training run in this process
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.length, args.samples, args.window, args.repeat, args.threads,
                                  args.dtype)))
    elif args.phases:
        run_phases(args.phases, args.tree, args.threads)
    elif args.train:
        train_table(args)
    elif args.saved:
        saved_table(args)
    else:
        attention_table(args)


if __name__ == "__main__":
    main()

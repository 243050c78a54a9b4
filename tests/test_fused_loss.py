"""The fused chunked head + loss (ddt/fused.py) against the unfused path (F.linear, then ddt_loss):
values, statistics and the gradients of hidden states and weight, at TP = 1 (the one-pass path,
no group or a group of one rank), 2 and 4 (two passes), with padded vocabularies, masked tokens,
ragged chunks, tied embeddings, bf16 inputs and a backward with grad_out != 1; with the compiled
chunk kernel (the default) and the eager one."""
import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_onpolicy.ddt import IDFTConfig, ddt_loss, fused, token_weights
from megatron_onpolicy.ddt.fused import CHUNK_BYTES, CHUNK_CAP, chunk_rows, fused_ddt_loss, fused_stats
from megatron_onpolicy.parallel.layers import VocabParallelEmbedding
from megatron_onpolicy.parallel.mappings import copy_to_tp
from tests.dist_utils import run_distributed
from tests.test_ddt_math import LOSSES, close, count_collectives

SHAPE, DIM = (3, 7), 16  # 21 tokens
CHUNKS = (None, 4, 1)    # one chunk; 6 chunks with a ragged last of 1; one token a chunk
GRAD_OUT = {4: 2.5}      # d L / d loss of the backward, by chunk (default 1)
STATS = ("logp", "entropy", "phi", "var")
# torch's addmm flop formula takes the out_dtype overload's extra argument for its out_shape and
# raises (pytorch/pytorch#164713); the bf16 path's weight gradient is that overload.
ADDMM_FLOPS = {torch.ops.aten.addmm: lambda bias, a, b, *args, out_shape=None, **kwargs: 2 * a[0] * a[1] * b[1]}


def make_case(vocab, padded, seed=0):
    """hidden [*SHAPE, DIM], the whole padded weight (garbage padding rows), targets, mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*SHAPE, DIM, generator=g) * 2
    weight = torch.randn(padded, DIM, generator=g)
    weight[vocab:] = 1e3  # would dominate every softmax if padding were read
    mask = (torch.rand(SHAPE, generator=g) < 0.7).float()
    mask[0, 0], mask[-1, -1] = 0.0, 1.0
    targets = torch.randint(0, vocab, SHAPE, generator=g).masked_fill(mask == 0, -100)
    return hidden, weight, targets, mask


def tp_info(group):
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def run_path(is_fused, hidden, shard, targets, mask, kind, lam, group, vocab, chunk=None, grad_out=1.0,
             count_flops=False, two_pass=False):
    """(loss, stats, hidden grad, weight grad, collectives of the forward, of the backward, matmul
    flops of the backward if counted) of one path; the backward is that of grad_out * loss.
    two_pass: the fused path's two passes (TP > 1's) whatever the group. Counting the flops runs
    the backward's eager kernels (dynamo does not compile under a dispatch mode)."""
    h = hidden.clone().requires_grad_()
    w = shard.clone().requires_grad_()
    x = copy_to_tp(h, group)  # the model's structure: the head's input is summed over TP in backward
    denom = float(mask.sum()) + 2  # the global batch's count, not this mask's
    with count_collectives() as forward:
        if two_pass:
            loss, stats, _, _ = fused._two_pass(x, w, targets, mask, denom, group, vocab, chunk,
                                                lambda s: token_weights(kind, s, lam, IDFTConfig(), vocab))
        elif is_fused:
            loss, stats, _, _ = fused_ddt_loss(x, w, targets, mask, kind, denom, group, vocab, lam,
                                               chunk_size=chunk)
        else:
            loss, stats, _, _ = ddt_loss(F.linear(x, w), targets, mask, kind, denom, group, vocab, lam)
    flops = FlopCounterMode(display=False, custom_mapping=ADDMM_FLOPS) if count_flops else contextlib.nullcontext()
    with count_collectives() as backward, flops:
        (grad_out * loss).backward()
    return (loss.detach(), stats, h.grad, w.grad, forward, backward,
            flops.get_total_flops() if count_flops else None)


def check_fused_matches_unfused(vocab, padded, group, two_pass=False):
    tp, rank = tp_info(group)
    passes = 2 if two_pass or tp > 1 else 1
    shard_rows = padded // tp
    rows = slice(rank * shard_rows, (rank + 1) * shard_rows)
    hidden, weight, targets, mask = make_case(vocab, padded)
    keep = mask.bool()
    shard = weight[rows]
    for kind, lam in LOSSES:
        ref = run_path(False, hidden, shard, targets, mask, kind, lam, group, vocab)
        for chunk in CHUNKS:
            what = f"TP={tp} V={vocab}/{padded} {kind} lam={lam} chunk={chunk} passes={passes}"
            grad_out = GRAD_OUT.get(chunk, 1.0)
            loss, stats, gh, gw, calls, back_calls, back_flops = run_path(
                True, hidden, shard, targets, mask, kind, lam, group, vocab, chunk, grad_out,
                count_flops=chunk is None, two_pass=two_pass)
            # One MAX and one SUM all-reduce forward, whatever the number of chunks; the backward's
            # only collective is copy_to_tp's sum of the hidden-state gradient.
            assert calls == ["all_reduce"] * (0 if tp == 1 else 2), (what, calls)
            assert back_calls == ref[5] == ["all_reduce"] * (tp > 1), (what, back_calls)
            # One pass: the forward formed both gradients, the backward only scales them (no
            # matmul); two: the backward recomputes the logits (of a shard that is not all padding).
            if back_flops is not None:
                assert (back_flops > 0) == (passes == 2 and vocab > rank * shard_rows), (what, back_flops)
            close(loss, ref[0], what=what + " loss")
            for name in STATS:
                sel = keep if name in ("logp", "phi") else slice(None)  # masked positions have no target
                close(getattr(stats, name)[sel], getattr(ref[1], name)[sel], what=f"{what} {name}")
            if passes == 1:  # the statistics the one pass logs are those of the no-grad path, bit for bit
                alone = fused_stats(hidden, shard, targets, group, vocab, chunk)
                assert all(torch.equal(getattr(stats, k), getattr(alone, k)) for k in vars(alone)), what
            close(gh, grad_out * ref[2], what=what + " hidden grad")
            close(gw, grad_out * ref[3], what=what + " weight grad")
            assert gw[max(0, vocab - rank * shard_rows):].abs().sum() == 0, what  # padding rows: no grad
            assert gh.dtype == gw.dtype == torch.float32, what


def check_tied_embedding(vocab, padded, group):
    """One weight as embedding and head: its gradient is the sum of both uses, fused as unfused."""
    tp, _ = tp_info(group)
    hidden, weight, targets, mask = make_case(vocab, padded, seed=1)
    ids = targets.clamp(min=0)
    grads = []
    for use_fused in (False, True):
        emb = VocabParallelEmbedding(vocab, DIM, group)
        with torch.no_grad():
            emb.weight.copy_(weight.chunk(tp)[tp_info(group)[1]])
        x = copy_to_tp(torch.tanh(emb(ids) + hidden), group)
        if use_fused:
            loss = fused_ddt_loss(x, emb.weight, targets, mask, "idft", 10.0, group, vocab, chunk_size=5)[0]
        else:
            loss = ddt_loss(F.linear(x, emb.weight), targets, mask, "idft", 10.0, group, vocab)[0]
        loss.backward()
        grads.append(emb.weight.grad)
    close(grads[1], grads[0], what=f"TP={tp} tied weight grad")


def check_far_shards(group):
    """One shard's logits ~300 below another's (its partial sums underflow to 0 against the
    global max) while holding targets: their log p_y stays exact (about -300)."""
    tp, rank = tp_info(group)
    hidden, weight, targets, mask = make_case(40, 40, seed=3)
    hidden[..., 0] = 1.0
    weight[:, 0] = 0.0
    weight[20:, 0] = -300.0  # the second half of the vocab (TP=2: rank 1's shard)
    targets = torch.where(torch.arange(targets.numel()).view(targets.shape) % 2 == 0, targets % 20 + 20,
                          targets).masked_fill(mask == 0, -100)
    shard = weight.chunk(tp)[rank]
    ref = run_path(False, hidden, shard, targets, mask, "ce", 1.0, group, 40)
    got = run_path(True, hidden, shard, targets, mask, "ce", 1.0, group, 40, 4)
    keep = mask.bool()
    assert (ref[1].logp[keep] < -250).any()
    close(got[1].logp[keep], ref[1].logp[keep], what="far shards logp")
    close(got[0], ref[0], what="far shards loss")
    close(got[2], ref[2], what="far shards hidden grad")
    close(got[3], ref[3], what="far shards weight grad")


def check_bf16(vocab, padded, group):
    """bf16 hidden and weight: fp32 accumulation inside, so each gradient is one bf16 rounding
    away from the fp32 computation on the same (bf16-valued) inputs."""
    tp, rank = tp_info(group)
    hidden, weight, targets, mask = make_case(vocab, padded, seed=2)
    hidden, shard = hidden.bfloat16(), weight.chunk(tp)[rank].bfloat16()
    ref = run_path(True, hidden.float(), shard.float(), targets, mask, "idft", 1.0, group, vocab, 4)
    got = run_path(True, hidden, shard, targets, mask, "idft", 1.0, group, vocab, 4)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    # The same fp32 arithmetic on the same values: the loss is equal and the weight gradient is
    # exactly the fp32 one rounded once to bf16 (no bf16 partial sums over chunks).
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[3], ref[3].bfloat16())
    if tp == 1:
        assert torch.equal(got[2], ref[2].bfloat16())
    else:  # copy_to_tp sums the TP partials of the hidden gradient in the model's dtype
        close(got[2], ref[2], atol=2 ** -7 * float(ref[2].abs().max()), rtol=2 ** -7, what="bf16 hidden grad")


@contextlib.contextmanager
def bf16_into_fp32_on_cpu():
    """CPU kernels for the two matmuls the bf16 path calls where the device has them (CUDA): `mm`
    and `addmm` with `out_dtype` fp32, which torch's CPU build lacks. Products of bf16 values are
    exact in fp32 and summed in fp32, as cuBLAS's fp32 compute does (the order of the sums aside),
    and CUDA's argument checks are repeated. They let the CPU run that path's own code: bf16
    operands, the bf16 logit gradient and its buffers, the accumulation. Yields the operand shapes
    of each call."""
    calls = []

    def checked(name, a, b, out_dtype, out):
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == out.dtype == torch.float32, name
        calls.append((name, tuple(a.shape), tuple(b.shape)))

    def mm(a, b, out_dtype, *, out):
        checked("mm", a, b, out_dtype, out)
        return torch.mm(a.float(), b.float(), out=out)

    def addmm(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        checked("addmm", a, b, out_dtype, out)
        return torch.addmm(acc, a.float(), b.float(), beta=beta, alpha=alpha, out=out)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm.dtype_out", mm, "CPU")
    lib.impl("addmm.dtype_out", addmm, "CPU")
    try:
        fused._mm_into_fp32.cache_clear()
        assert fused._mm_into_fp32(torch.device("cpu"))  # the path's probe finds the kernel
        calls.clear()
        yield calls
    finally:
        lib._destroy()
        fused._mm_into_fp32.cache_clear()


def check_bf16_operands(vocab, padded, group, two_pass=False):
    """Where bf16 matrices multiply into fp32, h and W enter every matmul in bf16 (no fp32 copy of
    W) and the logit gradient is rounded once to bf16: the loss and statistics are those of fp32
    arithmetic on the same values, each gradient within two bf16 roundings (2^-8 of the largest
    entry) of it. Checked with two passes too (TP = 4), where the backward rebuilds the logits."""
    tp, rank = tp_info(group)
    hidden, weight, targets, mask = make_case(vocab, padded, seed=2)
    hidden, shard = hidden.bfloat16(), weight.chunk(tp)[rank].bfloat16()
    n_valid = min(max(vocab - rank * shard.shape[0], 0), shard.shape[0])
    ref = run_path(True, hidden.float(), shard.float(), targets, mask, "idft", 1.0, group, vocab, 4, two_pass=two_pass)
    with bf16_into_fp32_on_cpu() as calls:
        got = run_path(True, hidden, shard, targets, mask, "idft", 1.0, group, vocab, 4, two_pass=two_pass)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    close(got[0], ref[0], rtol=1e-6, what="bf16 operands loss")
    close(got[1].entropy, ref[1].entropy, rtol=1e-6, what="bf16 operands entropy")
    # At TP > 1 copy_to_tp sums the hidden gradient's bf16 partials in bf16: one rounding more.
    for i, what, bits in ((2, "hidden", 8 - (tp > 1)), (3, "weight", 8)):
        close(got[i].float(), ref[i], rtol=0, atol=2 ** -bits * float(ref[i].abs().max()),
              what=f"bf16 operands {what} grad")
    # Each chunk's (4 rows, the last 1) logits and gradients came from the bf16 kernels, and nothing else.
    want = {call for k in (4, 1) for call in [("mm", (k, DIM), (DIM, n_valid)), ("mm", (k, n_valid), (n_valid, DIM)),
                                             ("addmm", (n_valid, k), (k, DIM))]}
    assert set(calls) == want, set(calls) ^ want


def check_frozen_input_and_second_backward():
    """One pass with only one input requiring a gradient gives that one; a second backward through
    the graph is an error, not a gradient scaled twice."""
    hidden, weight, targets, mask = make_case(37, 40, seed=4)
    ref = run_path(False, hidden, weight, targets, mask, "idft", 1.0, None, 37)
    for frozen in ("hidden", "weight"):
        h, w = hidden.clone().requires_grad_(frozen != "hidden"), weight.clone().requires_grad_(frozen != "weight")
        loss = fused_ddt_loss(h, w, targets, mask, "idft", float(mask.sum()) + 2, None, 37, chunk_size=4)[0]
        loss.backward(retain_graph=True)
        got, want = (w, ref[3]) if frozen == "hidden" else (h, ref[2])
        close(got.grad, want, what=f"frozen {frozen}")
        with pytest.raises(RuntimeError, match="backward twice"):
            loss.backward()


def test_chunk_rows():
    assert chunk_rows(49152, 576, 7) == 7
    for buffers in (2, 3):
        rows = chunk_rows(49152, 64, buffers=buffers)  # a small shard: CHUNK_BYTES
        assert rows * 49152 * 4 * buffers <= CHUNK_BYTES < (rows + 1) * 49152 * 4 * buffers
        # A shard between CHUNK_BYTES and CHUNK_CAP: the buffers take its fp32 size, dim / buffers rows.
        assert chunk_rows(49152, 2048, buffers=buffers) == 2048 // buffers
        rows = chunk_rows(151936, 3584, buffers=buffers)  # a 2.18 GB shard: CHUNK_CAP
        assert rows * 151936 * 4 * buffers <= CHUNK_CAP < (rows + 1) * 151936 * 4 * buffers
    assert chunk_rows(1 << 40, 1) == 1


@contextlib.contextmanager
def kernels(name):
    fused.set_kernels(name)
    try:
        yield
    finally:
        fused.set_kernels("compiled")


def test_compiled_sums_are_fp64_accurate():
    """The compiled kernel's e within an ulp or two of exp of the fp32 x = d - m, and its sums those
    of float64 over that e and x, rounded once to fp32; fp32 sums (inductor adds up to 4096 terms a
    lane in sequence on the CPU) were 1e-5 off at this width."""
    g = torch.Generator().manual_seed(5)
    d = torch.randn(8, 151936, generator=g) * 3
    e = torch.empty_like(d)
    m, *sums = fused._compiled(fused._moments)(d, e)
    assert torch.equal(m, d.amax(-1))
    x = (d - m.unsqueeze(-1)).double()
    close(e, x.exp(), rtol=2 ** -22, atol=0, what="e")
    for k, got in enumerate(sums):
        close(got.float(), (e.double() * x ** k).sum(-1), rtol=2 ** -23, atol=0, what=f"s{k}")


def test_compiled_kernel_holds_few_graphs():
    """Chunks of every row count, the ragged last, one row, narrow and wide shards, through the loss
    (one pass and two) and the statistics: each compiled kernel holds at most four graphs (inductor
    specializes one row and shards under 4097 columns), far from dynamo's recompile limit, past
    which it would run eager."""
    def graphs(kernel):
        return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(kernel))

    torch._dynamo.reset()
    for vocab, padded, chunk in ((37, 40, None), (37, 40, 4), (37, 40, 1), (5000, 5000, 3), (5000, 5000, 20)):
        hidden, weight, targets, mask = make_case(vocab, padded)
        for two_pass in (False, True):
            run_path(True, hidden, weight, targets, mask, "idft", 1.0, None, vocab, chunk, two_pass=two_pass)
        fused_stats(hidden, weight, targets, None, vocab, chunk)
    held = {kernel: graphs(kernel) for kernel in (fused._moments, fused._logit_grad)}
    assert all(2 <= n <= 4 for n in held.values()), held
    hidden, weight, targets, mask = make_case(5000, 5000)
    for chunk in (2, 5, 7, 11, 21):
        run_path(True, hidden, weight, targets, mask, "ce", 1.0, None, 5000, chunk, two_pass=True)
    assert {kernel: graphs(kernel) for kernel in held} == held


def test_a_kernel_that_cannot_be_built_names_the_eager_kernels():
    """No C++ compiler for inductor (as on a node without one): the error says how to run without."""
    import torch._inductor.config

    hidden, weight, targets, mask = make_case(37, 40)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent"), "fx_graph_cache": False}):
            with pytest.raises(RuntimeError, match="--fused-loss-kernel eager") as error:
                fused_stats(hidden, weight, targets, None, 37)
        assert "No working C++ compiler" in str(error.value)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("kernel", fused.KERNELS)
def test_single_process(kernel):
    with kernels(kernel):
        check_single_process()


def check_single_process():
    check_fused_matches_unfused(37, 40, None)
    check_fused_matches_unfused(37, 40, None, two_pass=True)  # a TP rank's passes, without the collectives
    check_tied_embedding(37, 37, None)
    check_bf16(37, 40, None)
    check_bf16_operands(37, 40, None)
    check_bf16_operands(37, 40, None, two_pass=True)
    check_frozen_input_and_second_backward()


def _tp_worker(rank, world_size):
    world = dist.group.WORLD
    check_fused_matches_unfused(37, 40, world)  # TP=4, last shard 7 real rows
    check_fused_matches_unfused(5, 8, world)    # shards of 2: one half padding, one all padding
    check_tied_embedding(37, 40, world)
    check_bf16(37, 40, world)
    check_bf16_operands(37, 40, world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # TP=2 twice: group ranks, not global
    check_fused_matches_unfused(37, 40, pairs[rank // 2])
    check_far_shards(pairs[rank // 2])
    singles = [dist.new_group([r]) for r in range(world_size)]  # the trainer's TP group at T = 1
    check_fused_matches_unfused(37, 40, singles[rank])
    with kernels("eager"):
        check_fused_matches_unfused(37, 40, world)


def test_tp2_and_tp4():
    run_distributed(_tp_worker, 4)


def test_ddt_score_rows_fused_equal_unfused(tmp_path):
    """tools/ddt_score.py's rows (score.score_batch): the fused statistics on the model's hidden
    states give the numbers of the logits path, tied and untied heads, chunks ragged or not."""
    from megatron_onpolicy.data import read_rows, tokenize_row
    from megatron_onpolicy.ddt.score import score_batch
    from megatron_onpolicy.model.loader import load_model, load_tokenizer
    from tests.train_utils import ROOT, make_tiny_model

    rows = read_rows(ROOT / "data" / "math_sft.jsonl")[:3]
    for tied in (True, False):
        model, folder = load_model(str(make_tiny_model(tmp_path / str(tied), layers=1, tied=tied)))
        tok = load_tokenizer(folder)
        samples = [tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(rows)]
        ref = score_batch(model, samples, 0, dump_tokens=True, fused=False)
        for chunk in (None, 7):
            got = score_batch(model, samples, 0, dump_tokens=True, fused=True, chunk_size=chunk)
            for a, b in zip(got, ref):
                assert a.keys() == b.keys() and a["num_tokens"] == b["num_tokens"] > 10
                for key, value in b.items():
                    assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (tied, chunk, key)

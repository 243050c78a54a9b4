"""Attention without L x L masks (model/attention.py): packed samples, sliding windows and left
padding against a dense reference written here (softmax over a masked score matrix) and against
the boolean-mask SDPA path, outputs and gradients; the packed model against transformers run on
each document alone; that no tensor with two L-sized dimensions is ever built; and a `--pack`
training run of a sliding-window model whose first loss is the token mean transformers gives."""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_onpolicy.data import collate, pack, read_rows, tokenize_row
from megatron_onpolicy.generate import SamplingParams, generate
from megatron_onpolicy.model import attention
from megatron_onpolicy.model.attention import attend, left_padded_spans, packed_spans
from megatron_onpolicy.model.hub import resolve_model_path
from megatron_onpolicy.model.llama import layer_masks
from megatron_onpolicy.model.loader import load_model, load_tokenizer
from megatron_onpolicy.train import model as train_model
from tests.test_model import VOCAB, make_hf_model
from tests.train_utils import ROOT, launch, read_metrics


# Documents of length 1 included; row 1 one document; rows 2 and 3 share a cut; rows end in padding (0).
SEG = torch.tensor([[1] * 1 + [2] * 12 + [3] * 1 + [4] * 20 + [0] * 6,
                    [1] * 40,
                    [1] * 7 + [2] * 7 + [3] * 7 + [4] + [5] * 7 + [0] * 11,
                    [1] * 7 + [2] * 7 + [3] * 7 + [4] + [5] * 7 + [0] * 11])
CUTS = [[0] + torch.unique_consecutive(row, return_counts=True)[1].cumsum(0).tolist() for row in SEG]


def allowed(seg, window):
    """[B, L, L]: query i may see key j (same document, j <= i, within the window), by plain loops."""
    return torch.tensor([[[j <= i and row[i] == row[j] and (window is None or i - j < window) for j in range(len(row))]
                          for i in range(len(row))] for row in seg.tolist()])


def mask_path(seg, window):
    """The boolean [B, 1, L, L] mask the model built for packed rows before model/attention.py."""
    idx = torch.arange(seg.shape[1])
    mask = (idx[None, :] <= idx[:, None]) & (seg[:, :, None] == seg[:, None, :])
    return (mask & (idx[None, :] > idx[:, None] - window) if window is not None else mask).unsqueeze(1)


def dense(q, k, v, ok):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~ok[:, None], float("-inf")).softmax(-1) @ v


def cuda_layout(sdpa):
    """SDPA with its output in the memory layout of CUDA's memory-efficient and flash kernels,
    [B, Lq, H, D] seen as [B, H, Lq, D]: the same values, but heads and queries cannot be merged by
    a view, which the CPU's contiguous output allows."""
    return lambda *args, **kwargs: sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)


def out_and_grads(fn, q, k, v, weight):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("window,block", [(None, 512), (1, 512), (3, 512), (8, 512), (8, 3), (13, 4), (64, 512)])
def test_packed_and_windowed_spans_equal_dense_and_mask_paths(monkeypatch, heads, window, block):
    """Windows shorter and longer than documents; block < window runs the first blocks' clipped keys.
    SDPA's output has CUDA's layout (cuda_layout)."""
    monkeypatch.setattr(attention, "WINDOW_BLOCK", block)
    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout(F.scaled_dot_product_attention))
    H, Hk = heads
    torch.manual_seed(0)
    B, L, D = *SEG.shape, 16
    q, k, v, weight = (torch.randn(B, h, L, D) for h in (H, Hk, Hk, H))
    spans = packed_spans(SEG).with_window(window)
    assert len(spans.groups) == 3, "rows 2 and 3 have one cut: one batched group"
    mask = mask_path(SEG, window)
    new = out_and_grads(lambda *t: attend(*t, spans, gqa=H != Hk), q, k, v, weight)
    ref = out_and_grads(lambda *t: dense(*t, allowed(SEG, window)), q, k, v, weight)
    old = out_and_grads(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask, enable_gqa=H != Hk),
                        q, k, v, weight)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), new, ref, old):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 64])
def test_flex_block_mask_is_the_spans(window):
    """The block mask CUDA's packed rows use (flex_attention; on the CPU it has no backward, so only
    the forward runs here, uncompiled): the positions it lets each query see are exactly the
    reference's, and flex_attention's output on it equals the dense reference, GQA and MHA."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention

    B, L, D = *SEG.shape, 16
    spans = packed_spans(SEG).with_window(window)
    bm = attention.block_mask(spans, L, torch.device("cpu"))
    assert torch.equal(create_mask(bm.mask_mod, B, 1, L, L, device="cpu")[:, 0], allowed(SEG, window))
    torch.manual_seed(0)
    for H, Hk in ((4, 2), (4, 4)):
        q, k, v = (torch.randn(B, h, L, D) for h in (H, Hk, Hk))
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=H != Hk)
        torch.testing.assert_close(out, dense(q, k, v, allowed(SEG, window)), rtol=0, atol=1e-5)
    assert attention.block_mask(spans, L, torch.device("cpu")) is bm  # one per batch and window
    assert spans.flex and not left_padded_spans([2, 0], 5).flex  # prompts' prefill keeps the spans


@pytest.mark.parametrize("window", [None, 1, 5, 127, 128, 200, 700])
def test_flex_block_mask_blocks_equal_create_block_mask(window):
    """The block mask is built from the spans block by block; torch's create_block_mask finds the
    blocks by evaluating the mask at every position. Both give the same partial and full blocks
    (kv and q orders) on random packings of rows that end in a partial block, documents of one
    token to several blocks, two rows alike (one group), windows within and across blocks."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(3)
    B, L = 4, 700
    rows = []
    for n_cuts in (9, 0, 40, 40):
        cuts = torch.randperm(L - 1, generator=g)[:n_cuts].add(1)
        rows.append(torch.zeros(L, dtype=torch.long).index_fill_(0, cuts, 1).cumsum(0))
    rows[2] = rows[3]
    seg = torch.stack(rows)

    def visible(b, h, qi, ki):
        keep = (qi >= ki) & (seg[b, qi] == seg[b, ki])
        return keep if window is None else keep & (qi - ki < window)

    ours = attention.block_mask(packed_spans(seg).with_window(window), L, torch.device("cpu"))
    ref = create_block_mask(visible, B, None, L, L, device="cpu")
    # Full blocks (no mask_mod in the kernel) exist where the window spans two blocks' distance.
    assert (int(ours.full_kv_num_blocks.sum()) > 0) == (window is None or window >= 2 * 128)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.seq_lengths == ref.seq_lengths


def test_flex_compiles_once_for_every_packing():
    """The compiled flex_attention call sees a new block mask (a new mask_mod closure) every batch:
    new packings of a row, and of rows of other lengths and counts, must not recompile it, or
    torch.compile would give up after its cache limit and run flex eagerly (scores of L x L).
    Dynamo's own frame counter, on a backend that does not generate code (the guards are the same)."""
    from torch._dynamo.testing import CompileCounter
    from torch.nn.attention.flex_attention import flex_attention

    counter = CompileCounter()
    compiled = torch.compile(flex_attention, backend=counter)
    g = torch.Generator().manual_seed(0)
    frames = []
    for B, L in [(1, 256)] * 4 + [(1, 384), (1, 500), (2, 500), (3, 1000)]:
        cuts = sorted(torch.randperm(L - 1, generator=g)[:4].add(1).tolist())
        seg = torch.tensor([sum(t >= c for c in cuts) for t in range(L)]).expand(B, -1)
        q, k, v = (torch.randn(B, h, L, 8, generator=g) for h in (4, 2, 2))
        mask = attention.block_mask(packed_spans(seg), L, torch.device("cpu"))
        compiled(q, k, v, block_mask=mask, enable_gqa=True)
        frames.append(counter.frame_count)
    # One graph for the first shape, then one more for each size that changes (it is then dynamic):
    # the length, then the row count.
    assert frames == [1] * 4 + [2, 2, 3, 3], frames


@pytest.mark.parametrize("window", [None, 3])
def test_left_padded_prompts_attend_within_themselves(window, monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout(F.scaled_dot_product_attention))
    torch.manual_seed(1)
    pads, W = [0, 3, 9], 12
    q, k, v = torch.randn(3, 4, W, 8), torch.randn(3, 2, W, 8), torch.randn(3, 2, W, 8)
    seg = torch.tensor([[0] * p + [1] * (W - p) for p in pads])
    out = attend(q, k, v, left_padded_spans(pads, W).with_window(window), gqa=True)
    ref = dense(q, k, v, allowed(seg, window))
    for r, p in enumerate(pads):
        torch.testing.assert_close(out[r, :, p:], ref[r, :, p:], rtol=0, atol=1e-5)
        assert not out[r, :, :p].any(), "pad queries output zeros"


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("heads", [(6, 2), (6, 3), (6, 6)], ids=["gqa3", "gqa2", "mha"])
def test_a_decode_step_attends_like_the_dense_reference(heads, layout, monkeypatch):
    """One query a row against a cache of keys, some masked (pads, unwritten columns), as decode
    steps run it: GQA folds a group's query heads into one K/V head's rows, which must keep query
    head i on K/V head i // group, whatever the memory layout SDPA's output has."""
    if layout == "cuda":
        monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout(F.scaled_dot_product_attention))
    H, Hk = heads
    torch.manual_seed(2)
    B, L, D = 3, 10, 8
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hk, L, D), torch.randn(B, Hk, L, D)
    ok = torch.rand(B, 1, L) < 0.6
    ok[:, :, 0] = True  # every row has a key
    mask = torch.zeros(B, 1, 1, L).masked_fill(~ok[:, None], float("-inf"))  # additive, as attention_mask
    out = attend(q, k, v, mask, gqa=H != Hk)
    torch.testing.assert_close(out, dense(q, k, v, ok), rtol=0, atol=1e-6)
    if H == Hk:
        return
    # SDPA's math kernel, which CUDA runs in fp32 for `enable_gqa`, copies K and V to every query
    # head: the fold runs no op that outputs a tensor that large, where `enable_gqa` does.
    for old in (False, True):
        with sdpa_kernel(SDPBackend.MATH), OutputSizes() as seen:
            if old:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            else:
                attend(q, k, v, mask, gqa=True)
        assert (max(seen.numels) >= B * H * L * D) == old, max(seen.numels)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in ("llama-tied", "mistral-window")}


@pytest.mark.parametrize("kind", ["llama-tied", "mistral-window"])
def test_packed_model_equals_transformers_per_document_and_mask_path_gradients(hf_models, kind):
    """Logits of each packed document equal transformers on that document alone; all parameter
    gradients equal those of the same forward through boolean [B, 1, L, L] masks."""
    folder, hf = hf_models[kind]
    model, _ = load_model(str(folder))
    torch.manual_seed(2)
    B, L = SEG.shape
    ids = torch.randint(0, VOCAB, (B, L))
    pos = torch.tensor([[i - s for s, e in zip(c, c[1:]) for i in range(s, e)] for c in CUTS])
    logits = model(ids, pos, segment_ids=SEG)
    for b, cuts in enumerate(CUTS):
        for s, e in zip(cuts, cuts[1:]):  # the padding run too: it is one more causal span
            with torch.no_grad():
                theirs = hf(ids[b:b + 1, s:e]).logits[0]
            torch.testing.assert_close(logits[b, s:e, :VOCAB], theirs, rtol=0, atol=2e-5)

    weight = torch.randn_like(logits)
    grads = []
    for masks in (None, [mask_path(SEG, w) for w in model.cfg.windows]):
        model.zero_grad()
        (model(ids, pos, segment_ids=SEG, masks=masks) * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:  # two fp32 summation orders: equal to rounding, relative to the largest entry
        scale = grads[0][n].abs().max().item()
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=2e-6 * scale, msg=n)


class OutputSizes(TorchDispatchMode):
    """Records the number of elements of every aten op's output."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
                        if isinstance(t, torch.Tensor)]
        return out


class TwoLongDims(TorchDispatchMode):
    """Records every aten op's output with two dimensions of at least `size`, forward and backward."""

    def __init__(self, size):
        super().__init__()
        self.size, self.hits, self.ops = size, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and sum(d >= self.size for d in t.shape) >= 2:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def test_no_l_by_l_tensor_in_packed_training_or_prefill(hf_models):
    """L = 1024 of documents <= 300 tokens: no op, forward or backward, outputs a tensor with two
    dimensions >= 512. The same check catches today's mask path, so it can fail."""
    model, _ = load_model(str(hf_models["llama-tied"][0]))
    L, lengths = 1024, [300, 1, 200, 123, 300, 100]
    seg = torch.cat([torch.full((n,), k + 1) for k, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, VOCAB, (1, L))
    for masks in (None, [mask_path(seg, None)] * model.cfg.num_layers):
        with TwoLongDims(L // 2) as seen:
            model(ids, pos, segment_ids=seg, masks=masks).sum().backward()
        assert any("backward" in op for op in seen.ops), "the check must see the backward pass"
        assert bool(seen.hits) == (masks is not None), seen.hits[:5]
    with TwoLongDims(L // 2) as seen:  # left-padded prefill; decode steps use [B, 1, 1, Lk] masks
        generate(model, [[5] * 5, [7] * 900], SamplingParams(temperature=0.0, max_new_tokens=2))
    assert not seen.hits, seen.hits[:5]


def test_no_l_by_l_tensor_in_a_sliding_window():
    """One 1024-token sample, window 100, forward and backward: blocks of 100 queries against 200 keys."""
    L, seg = 1024, torch.ones(1, 1024, dtype=torch.long)
    for old in (False, True):
        q, k, v = (torch.randn(1, h, L, 16, requires_grad=True) for h in (4, 2, 2))
        with TwoLongDims(L // 2) as seen:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_path(seg, 100), enable_gqa=True) if old \
                else attend(q, k, v, packed_spans(seg).with_window(100), gqa=True)
            out.sum().backward()
        assert any("backward" in op for op in seen.ops) and bool(seen.hits) == old, seen.hits[:5]


def test_layer_masks_keep_plain_causal_on_the_fast_path(hf_models):
    model, _ = load_model(str(hf_models["llama-tied"][0]))
    pos = torch.arange(16).expand(2, 16)
    assert layer_masks(model.cfg, pos) == [None] * model.cfg.num_layers
    window = load_model(str(hf_models["mistral-window"][0]))[0].cfg  # window 5
    assert [s.window for s in layer_masks(window, pos)] == [5] * window.num_layers
    assert layer_masks(window, torch.arange(4).expand(2, 4)) == [None] * window.num_layers


def test_stage_masks_made_once_per_micro_batch(hf_models, monkeypatch):
    """A pipeline stage's layers share one StageMasks: the packed spans (a host sync) are made
    once per micro-batch's ids tensor, and anew for the next one even where its values differ
    only slightly."""
    cfg = load_model(str(hf_models["llama-tied"][0]))[0].cfg
    calls = []
    monkeypatch.setattr(train_model, "layer_masks", lambda *a: calls.append(a) or layer_masks(*a))
    masks = train_model.StageMasks(cfg)
    pos = torch.arange(8).expand(1, 8)
    first = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    got = [masks(pos, first) for _ in range(cfg.num_layers)]
    assert len(calls) == 1 and all(m is got[0] for m in got)
    second = first.clone()
    second[0, 2] = 1  # the next micro-batch: another tensor, other cuts
    assert masks(pos, second) == layer_masks(cfg, pos, second) != got[0]
    assert len(calls) == 2


def test_pack_training_loss_equals_transformers_per_sample(tmp_path):
    """One `--pack` iteration at --lr 0 whose global batch holds every pack of the data, on a
    sliding-window model (window 24, shorter than the samples): its CE loss is the token mean of
    transformers' per-sample CE, so the packed attention trains what transformers computes."""
    config = transformers.MistralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path / "tiny")
    tok = load_tokenizer(resolve_model_path("smollm2-135m"))
    tok.save_pretrained(tmp_path / "tiny")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)[:16]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    samples = [tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(read_rows(tmp_path / "train.jsonl"))]
    n_packs = len(pack(samples, 512))
    result = launch(0, "--model", tmp_path / "tiny", "--train-data", tmp_path / "train.jsonl", "--pack",
                    "--seq-length", 512, "--micro-batch-size", 1, "--global-batch-size", n_packs, "--loss", "ce",
                    "--lr", 0, "--train-iters", 1, "--save", tmp_path / "run",
                    "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    first = read_metrics(tmp_path / "run")[0]

    b = collate(samples, 0)
    with torch.no_grad():
        logp = hf(b["input_ids"]).logits.double().log_softmax(-1)
    keep = b["loss_mask"] > 0
    ce = -logp.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    assert max(len(s.input_ids) for s in samples) > 24 and n_packs < len(samples), "windows and packs both bite"
    assert first["loss_tokens"] == keep.sum()
    assert first["loss"] == pytest.approx(ce.mean().item(), rel=1e-5)

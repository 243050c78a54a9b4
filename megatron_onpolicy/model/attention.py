"""Attention without L x L masks: packed samples, left padding and sliding windows as spans.

A layer's attention is one of
  None      plain causal over the whole row: SDPA `is_causal`, the fused (flash) kernel on CPU and CUDA;
  a Tensor  an explicit boolean [B, 1, Lq, Lk] mask (decode steps, where Lq is 1);
  Spans     each row cut into contiguous spans (packed samples, the padding of a left-padded prompt);
            a span attends causally within itself, in a sliding window if one is set.
A span is one `is_causal` SDPA call on its part of q, k, v: exact (nothing outside the span enters
the softmax), the fast kernel, no mask at all. A window longer than its span is plain causality;
a shorter one runs query blocks of b rows against the keys of the blocks the window reaches
(b + window - 1 of them, rounded up to whole blocks) with one shared band mask of that size. K/V
are not expanded for GQA (`enable_gqa`), except in fp32 on CUDA (`_sdpa`); a decode step folds a
group's queries into one K/V head's query rows instead (`_one_query`). Rows with the same cut
are one batched call.
With the `flex` backend (`set_backend`, the trainer's `--attention-backend flex`), CUDA runs
packed and windowed rows instead as one compiled flex_attention call on a document + causal
(+ window) block mask, built once per batch and window from the spans (never an L x L mask) and
shared by the layers: per-span SDPA calls cost kernel launches that a GPU does not amortize (on
an H100 flex took 0.84x the spans' time in fp32 and 0.40x in bf16 on a 4k row of 8 samples). It
is not the default: in the trainer on an H100 it was slower than padding (docs/performance.md),
and it needs a working torch.compile (Triton, a C compiler). The spans stay the path on the CPU
(flex_attention has no backward there, torch 2.13), for heads under 16 wide (Triton's smallest
matmul), and for a prompt batch's prefill (`flex` off): its width changes with every batch, each
a new compiled shape, for one call a batch."""
import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex")
_backend = "sdpa"
FLEX_BLOCK = 128  # flex_attention's (sparse) block size
FLEX_MIN_HEAD_DIM = 16  # Triton's tl.dot: flex_attention's CUDA kernels need heads at least this wide


def set_backend(name: str):
    """The process's attention backend for Spans: "sdpa" (the spans' SDPA calls) or "flex"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend: one of {BACKENDS}, not {name!r}")
    _backend = name


# Query block of a sliding window shorter than its span: the band mask is at most about
# WINDOW_BLOCK x (2 WINDOW_BLOCK + window), and each query scores fewer than 2 WINDOW_BLOCK keys it cannot see.
WINDOW_BLOCK = 512


@dataclass(frozen=True)
class Spans:
    """groups: ((row_start, row_end, ((start, end, live), ...)), ...): consecutive rows with one
    cut share a group; a span that is not live (a prompt's left padding) outputs zeros. flex: CUDA
    may run them as one flex_attention call (all spans live)."""
    groups: tuple
    window: int | None = None
    flex: bool = True

    def with_window(self, window):
        return replace(self, window=window)


def _grouped(rows, **kwargs):
    """rows: one tuple of (start, end, live) spans per row -> Spans, equal neighbours merged."""
    groups = []
    for r, spans in enumerate(rows):
        if groups and groups[-1][2] == spans:
            groups[-1][1] = r + 1
        else:
            groups.append([r, r + 1, spans])
    return Spans(tuple((a, b, spans) for a, b, spans in groups), **kwargs)


def packed_spans(segment_ids) -> Spans:
    """Spans of a packed batch: every maximal run of one segment id (the padding run included, so
    no query row is empty). One host sync for the whole batch."""
    B, L = segment_ids.shape
    cuts = [[] for _ in range(B)]
    for r, t in (segment_ids[:, 1:] != segment_ids[:, :-1]).nonzero().tolist():
        cuts[r].append(t + 1)
    return _grouped([tuple((s, e, True) for s, e in zip([0] + c, c + [L])) for c in cuts])


def left_padded_spans(pads, width) -> Spans:
    """Spans of left-padded prompts: row r's pads[r] pad positions output zeros (finite values for
    the cache, never attended by a real query), its prompt attends causally."""
    return _grouped([((0, p, False), (p, width, True)) if p else ((0, width, True),) for p in pads], flex=False)


def attend(q, k, v, how, gqa: bool):
    """q [B, H, Lq, D], k / v [B, H_kv, Lk, D] -> [B, H, Lq, D]; `how` as in the module docstring."""
    if how is None:
        return _sdpa(q, k, v, gqa, is_causal=True)
    if isinstance(how, torch.Tensor):
        if gqa and q.shape[2] == 1:
            return _one_query(q, k, v, how)
        return _sdpa(q, k, v, gqa, attn_mask=how)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"spans need as many keys as queries, got {k.shape[2]} keys for {q.shape[2]} queries")
    if q.is_cuda and how.flex and _backend == "flex" and q.shape[-1] >= FLEX_MIN_HEAD_DIM:
        return _compiled_flex()(q, k, v, block_mask=block_mask(how, q.shape[2], q.device), enable_gqa=gqa)
    # split, not slicing: the backward of a split is one cat, that of each slice a zero-filled
    # tensor of the whole input (per span, which made the backward O(spans x L)).
    rows = []
    groups = zip(*(t.split([r1 - r0 for r0, r1, _ in how.groups]) for t in (q, k, v)), how.groups)
    for qg, kg, vg, (_, _, spans) in groups:
        sizes = [e - s for s, e, _ in spans]
        parts = [_causal(qs, ks, vs, how.window, gqa) if live else qs.new_zeros(qs.shape)
                 for qs, ks, vs, (_, _, live) in zip(qg.split(sizes, 2), kg.split(sizes, 2), vg.split(sizes, 2), spans)]
        rows.append(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
    return torch.cat(rows, 0) if len(rows) > 1 else rows[0]


def _causal(q, k, v, window, gqa):
    """Causal attention within one span, within `window` positions back if that is shorter."""
    n = q.shape[2]
    if window is None or window >= n:
        return _sdpa(q, k, v, gqa, is_causal=True)
    b = min(window, WINDOW_BLOCK)
    back = -(-(window - 1) // b) * b  # keys before a block: whole blocks, at least window - 1
    # Column j of a block starting at s is key s - back + j: query i sees keys j in (i + back - window, i + back].
    i = torch.arange(b, device=q.device)[:, None]
    j = torch.arange(b + back, device=q.device)
    band = (j <= i + back) & (j > i + back - window)
    # Query and key blocks are splits and cats (whose backwards are cats and splits), not slices.
    kb, vb = k.split(b, 2), v.split(b, 2)
    out = []
    for blk, qs in enumerate(q.split(b, 2)):
        first = max(0, blk - back // b)  # the first blocks have no keys before the span's start
        ks, vs = torch.cat(kb[first:blk + 1], 2), torch.cat(vb[first:blk + 1], 2)
        off = back - (blk - first) * b
        mask = band[:qs.shape[2], off:off + ks.shape[2]]
        out.append(_sdpa(qs, ks, vs, gqa, attn_mask=mask))
    return torch.cat(out, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=8)
def block_mask(how: Spans, length: int, device):
    """flex_attention's block mask of live spans: a query sees the keys of its own span, causally,
    within the window. Built from the spans block by block (O((L / 128)^2) a row, where
    create_block_mask would evaluate the mask at all L x L positions). Cached: every layer of a
    forward (and its recomputation) asks for the same one, and a pipeline stage holds a few
    micro-batches at once."""
    from torch.nn.attention.flex_attention import BlockMask

    lens = [torch.tensor([e - s for s, e, _ in spans]) for _, _, spans in how.groups]
    reps = torch.tensor([r1 - r0 for r0, r1, _ in how.groups])
    # [B, L]: each position's span within its row, and the first key a query there may see.
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(n)), n) for n in lens]).repeat_interleave(reps, 0)
    lo = torch.stack([torch.repeat_interleave(n.cumsum(0) - n, n) for n in lens]).repeat_interleave(reps, 0)
    window = how.window
    if window is not None:
        lo = torch.maximum(lo, torch.arange(length) - window + 1)
    doc, lo = doc.to(device), lo.to(device)

    # Block i holds positions [start_i, end_i]. The first key a query may see (lo) never decreases
    # along a row, so a key block j <= i has a visible key iff the query block's first query sees
    # one, lo[start_i] <= end_j; the pair is full iff both blocks are whole and j < i with
    # lo[end_i] <= start_j (every query of block i sees every key of block j).
    start = torch.arange(0, length, FLEX_BLOCK, device=device)
    end = (start + FLEX_BLOCK - 1).clamp(max=length - 1)
    whole = end - start == FLEX_BLOCK - 1
    blocks = torch.arange(len(start), device=device)
    i, j = blocks[:, None], blocks[None]
    some = (j <= i) & (lo[:, start][:, :, None] <= end)
    full = (j < i) & (lo[:, end][:, :, None] <= start) & whole[:, None] & whole

    def ordered(blocks):  # [B, nb, nb] -> per query block: the count and, first, the kv blocks' indices
        blocks = blocks[:, None]
        return (blocks.sum(-1, dtype=torch.int32),
                torch.argsort(blocks.int(), dim=-1, descending=True, stable=True).int())

    def mask_mod(b, h, qi, ki):
        keep = (qi >= ki) & (doc[b, qi] == doc[b, ki])
        return keep if window is None else keep & (qi - ki < window)

    return BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def _one_query(q, k, v, mask):
    """A decode step's GQA attention: the one query of each head of a group becomes a query row of
    the group's K/V head, [B, H, 1, D] -> [B, H_kv, H / H_kv, D] (query head i reads K/V head
    i // (H / H_kv), as `enable_gqa` has it). The same sums, and no kernel expands K/V: on CUDA in
    fp32 `enable_gqa` runs SDPA's math kernel, which copies the layer's whole cache to do so, where
    equal head counts run the memory-efficient one. mask [B, 1, 1, Lk] covers the group's rows."""
    b, h, _, d = q.shape
    out = F.scaled_dot_product_attention(q.view(b, k.shape[1], h // k.shape[1], d), k, v, attn_mask=mask)
    return out.reshape(b, h, 1, d)  # not a view: CUDA's kernels lay the output out [B, Lq, H, D]


def _sdpa(q, k, v, gqa: bool, **kwargs):
    """SDPA with K/V heads shared by groups of query heads. On CUDA in fp32 no fused kernel takes
    `enable_gqa` (flash wants 16-bit inputs, the memory-efficient kernel equal head counts), and SDPA
    falls silently to the math kernel, which builds [B, H, Lq, Lk] (pytorch/pytorch#181528; 2.5 GB
    for one 4k row of SmolLM2 on an H100, docs/performance.md): there K/V are expanded instead
    (a decode step's one query never comes here: `_one_query`)."""
    if gqa and q.is_cuda and q.dtype == torch.float32 and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **kwargs)

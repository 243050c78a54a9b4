"""Preallocated key/value cache for generation, one per decoder layer, and the two ways a forward
writes it (the attention layer calls `update(k, v)` on what it is handed as its cache).

Each tensor-parallel rank caches only its own KV heads (the attention layer hands it keys and
values already split by head), so the cache is sharded exactly like the heads."""
import torch


class KVCache:
    """Keys and values of one layer, [B, H_kv_local, max_len, D]: allocated once for prompt + new
    tokens, so decoding never reallocates or concatenates. Zeros, not uninitialized memory: a
    static-shape decode step attends over every column under a mask, and a masked key must still
    be finite (NaN - inf is NaN)."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


class RowsView:
    """A layer's cache as one prefill group writes it: the group's rows, its keys and values
    right-aligned to end at `end`; the columns before them, never attended, are zeroed (finite)."""

    def __init__(self, cache: KVCache, rows, end: int):
        self.cache, self.rows, self.end = cache, rows, end

    def update(self, k, v):
        start = self.end - k.shape[2]
        for full, new in ((self.cache.k, k), (self.cache.v, v)):
            full[self.rows, :, :start] = 0
            full[self.rows, :, start:self.end] = new
        return k, v  # a prefill attends within its own prompts only


class ColumnView:
    """A layer's cache as one decode step writes it: every row's new key and value at column `col`
    (a one-element device tensor, so that a captured step reads it at replay), then the first
    `keys` columns for attention."""

    def __init__(self, cache: KVCache, col, keys: int):
        self.cache, self.col, self.keys = cache, col, keys

    def update(self, k, v):
        self.cache.k.index_copy_(2, self.col, k)
        self.cache.v.index_copy_(2, self.col, v)
        return self.cache.k[:, :, :self.keys], self.cache.v[:, :, :self.keys]


def make_caches(model, batch: int, max_len: int) -> list[KVCache]:
    """One cache per layer of a TransformerLM, in the model's dtype and on its device."""
    p = next(model.parameters())
    return [KVCache(batch, layer.attn.kv_heads, layer.attn.head_dim, max_len, p.dtype, p.device)
            for layer in model.layers]

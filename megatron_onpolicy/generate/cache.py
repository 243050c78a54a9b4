"""Preallocated key/value cache for generation, one per decoder layer.

Each tensor-parallel rank caches only its own KV heads (the attention layer hands it keys and
values already split by head), so the cache is sharded exactly like the heads."""
import torch


class KVCache:
    """Keys and values of one layer, [B, H_kv_local, max_len, D], filled left to right.

    Allocated once for prompt + new tokens, so decoding never reallocates or concatenates."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype, device):
        self.k = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def update(self, k, v):
        """Append k, v ([B, H_kv_local, L_new, D], after RoPE); return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.k.shape[2]} allocated")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def make_caches(model, batch: int, max_len: int) -> list[KVCache]:
    """One cache per layer of a TransformerLM, in the model's dtype and on its device."""
    p = next(model.parameters())
    return [KVCache(batch, layer.attn.kv_heads, layer.attn.head_dim, max_len, p.dtype, p.device)
            for layer in model.layers]

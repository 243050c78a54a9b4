"""A Llama-family decoder built from tensor-parallel layers.

Readable top to bottom: embedding -> N x (attention + SwiGLU MLP, pre-RMSNorm) -> norm -> head.
The head returns *vocab-sharded* logits [B, L, V_shard]; nothing here gathers the vocabulary."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                               padded_vocab_size, tp_size_rank)
from ..parallel.mappings import copy_to_tp
from .attention import Spans, attend, packed_spans
from .config import ArchConfig


class RMSNorm(nn.Module):
    """tp_group: the norm sees only this rank's share of what it normalizes (Qwen3's per-head q / k
    norms, applied to the rank's own heads), so its replicated weight's gradient, a sum over all
    heads, is summed over the TP ranks. Without it each rank would train its own copy."""

    def __init__(self, dim, eps, dtype=None, tp_group=None):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype))

    def forward(self, x):
        # fp32 statistics, as transformers does, so bf16 runs match it. F.rms_norm is transformers'
        # arithmetic op for op on the CPU (the same bits), and a fused kernel where torch has one.
        return copy_to_tp(self.weight, self.tp_group) * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """cos / sin tables from transformers' own RoPE initialisers (default, linear, llama3, yarn, ...)."""

    def __init__(self, hf_config):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(hf_config, "rope_parameters", None) or {}
        kind = params.get("rope_type", "default")
        if kind == "default":
            base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.scaling = 1.0
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[kind](hf_config)
        # A plain attribute, not a buffer: module.to(bf16) (DeepSpeed's bf16 mode) must not round it.
        self.inv_freq = inv_freq.float()

    def forward(self, position_ids, dtype):
        """cos and the signed sin of `apply_rope`, [B, L, 1, D] (one head axis to broadcast), made
        once per forward for all layers."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None, None].float() * self.inv_freq
        cos, sin = freqs.cos() * self.scaling, freqs.sin() * self.scaling
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, L, H, D]; cos, sin: Rotary's. transformers' x cos + rotate_half(x) sin, where
    rotate_half(x) = [-x2, x1] = roll(x) with the first half negated; the sign is in `sin`, and a
    negation is exact, so the result is the same to the bit in one op fewer a call."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_mask(q_pos, k_pos, dtype, window=None, k_valid=None):
    """Additive [B, 1, Lq, Lk] mask (0: may attend, -inf: may not) in dtype from absolute positions,
    for decode steps (Lq = 1; longer queries take Spans, model/attention.py): made once a step, it
    spares every layer's SDPA the conversion of a boolean one. k_valid marks real (non-pad) keys."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, tp_group, dtype=None):
        super().__init__()
        tp, _ = tp_size_rank(tp_group)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        # One fused projection; this rank's rows are [q heads | k heads | v heads] of its shard.
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, tp_group=tp_group, dtype=dtype)
        self.o = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias,
                                   tp_group=tp_group, dtype=dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, tp_group)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, tp_group)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, L, _ = x.shape
        qk, v = self.qkv(x).split([(self.heads + self.kv_heads) * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        qk = qk.view(B, L, self.heads + self.kv_heads, self.head_dim)
        v = v.view(B, L, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.heads, self.kv_heads], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        # The q and k heads side by side take RoPE in one go: half its ops (a decode step's limit).
        q, k = apply_rope(qk, cos, sin).split([self.heads, self.kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        if cache is not None:
            k, v = cache.update(k, v)
        out = attend(q, k, v, mask, gqa=self.heads != self.kv_heads)
        return self.o(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, tp_group, dtype=None):
        super().__init__()
        # Fused [gate | up] rows of this rank's shard: one matmul, one input all-reduce in backward.
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias,
                                            tp_group=tp_group, dtype=dtype)
        self.down = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias,
                                      tp_group=tp_group, dtype=dtype)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, tp_group, dtype=None):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, tp_group, dtype)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, tp_group, dtype)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attn_norm(x))


class LMHead(nn.Module):
    """Vocab-parallel output projection; with tied embeddings it borrows the embedding's weight."""

    def __init__(self, cfg: ArchConfig, tp_group, embedding=None, dtype=None):
        super().__init__()
        self.tp_group = tp_group
        self.tied = embedding
        if embedding is None:
            padded = padded_vocab_size(cfg.vocab_size, tp_size_rank(tp_group)[0])
            self.proj = ColumnParallelLinear(cfg.hidden_size, padded, tp_group=tp_group, dtype=dtype)

    @property
    def weight(self):
        return self.tied.weight if self.tied is not None else self.proj.weight

    def forward(self, h):
        return F.linear(copy_to_tp(h, self.tp_group), self.weight)


class TransformerLM(nn.Module):
    """The whole model on one pipeline stage; `forward` returns vocab-sharded logits."""

    def __init__(self, cfg: ArchConfig, tp_group=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.tp_group = tp_group
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, dtype)
        self.rotary = Rotary(cfg.hf_config)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp_group, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = LMHead(cfg, tp_group, self.embed if cfg.tie_word_embeddings else None, dtype)

    def forward(self, input_ids, position_ids=None, segment_ids=None, masks=None, caches=None,
                last_only=False, hidden_only=False):
        """masks: per-layer attention (None, a mask or Spans, see model/attention.py), e.g. from
        generation; otherwise built here from the windows and segment ids (packed samples).
        last_only: logits of the last position only (generation: no [B, L, V] logits at prefill).
        hidden_only: the final (normed) hidden states instead, for a fused head + loss."""
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.embed(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        if masks is None:
            masks = layer_masks(self.cfg, position_ids, segment_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, masks[i], None if caches is None else caches[i])
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if hidden_only else self.lm_head(x)


def layer_masks(cfg: ArchConfig, position_ids, segment_ids=None):
    """Per-layer attention for a training / scoring forward (see model/attention.py): None (plain
    causal, the fast SDPA path) where nothing but causality applies, otherwise Spans: the packed
    samples (runs of one segment id) or whole rows, each with its layer's window. Packed samples
    restart their positions, so causality is taken over the index in the row, not over position ids."""
    B, L = position_ids.shape
    windows = [w if (w is not None and w < L) else None for w in cfg.windows]
    if segment_ids is None and not any(windows):
        return [None] * cfg.num_layers
    spans = packed_spans(segment_ids) if segment_ids is not None else Spans(((0, B, ((0, L, True),)),))
    return [spans.with_window(w) for w in windows]

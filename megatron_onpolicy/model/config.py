"""The Llama-family architecture read off a Hugging Face config (Llama, Mistral, Qwen2/2.5/3, SmolLM2)."""
from dataclasses import dataclass

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool      # Qwen2 always; Llama / Qwen3 when attention_bias
    o_bias: bool        # Llama / Qwen3 when attention_bias
    mlp_bias: bool      # Llama when mlp_bias
    qk_norm: bool       # Qwen3: RMSNorm over head_dim on q and k before RoPE
    windows: tuple      # per layer: None, or attend to at most this many positions back
    hf_config: object   # kept for RoPE initialisation and for export

    @classmethod
    def from_hf(cls, hf):
        kind = hf.model_type
        if kind not in SUPPORTED:
            raise ModelConfigError(f"model_type '{kind}' is not supported (supported: {', '.join(SUPPORTED)})")
        # What transformers' modeling code of each family reads, and only that: a key it ignores
        # (a Llama config's sliding_window, a Mistral config's attention_bias) must not change ours.
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"hidden_act '{act}' is not supported (the Llama family's MLP is silu)")
        rope = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope in ("dynamic", "longrope"):  # transformers recomputes these frequencies for long inputs
            raise ModelConfigError(f"rope_type '{rope}' is not supported (its frequencies depend on the input length)")
        # Which layers slide: layer_types (Qwen2/3 derive them from use_sliding_window and
        # max_window_layers), every layer of a Mistral when a window is set, no layer of a Llama.
        window = getattr(hf, "sliding_window", None)
        types = getattr(hf, "layer_types", None) or \
            ["sliding_attention" if window and kind == "mistral" else "full_attention"] * hf.num_hidden_layers
        windows = tuple(window if t == "sliding_attention" else None for t in types)
        heads = hf.num_attention_heads
        bias = kind in ("llama", "qwen3") and bool(getattr(hf, "attention_bias", False))
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bias,
            o_bias=kind != "qwen2" and bias,
            mlp_bias=kind == "llama" and bool(getattr(hf, "mlp_bias", False)),
            qk_norm=kind == "qwen3",
            windows=windows,
            hf_config=hf,
        )

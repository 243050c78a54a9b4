"""Build the TP model for a named checkpoint and fill it with this rank's slices."""
import torch
from transformers import AutoConfig

from ..data.rows import one_line
from ..parallel.layers import tp_size_rank
from ..parallel.state import check_layout
from .config import ArchConfig
from .hf_io import load_hf_weights
from .hub import ModelPathError, resolve_model_path
from .hub import load_tokenizer  # noqa: F401 (the tools and the trainer take it from here)
from .llama import TransformerLM


def load_arch(name: str):
    """(HF folder, ArchConfig) for a model name; cheap, so layouts can be checked before work."""
    folder = resolve_model_path(name)
    try:
        hf = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:  # a config.json that is no JSON, or of a model_type transformers lacks
        raise ModelPathError(f"{folder}/config.json: transformers cannot read it ({one_line(e)})") from None
    return folder, ArchConfig.from_hf(hf)


def load_model(name: str, tp_group=None, dtype=torch.float32, device="cpu"):
    """-> (TransformerLM on `device` holding this rank's shards, HF folder)."""
    folder, cfg = load_arch(name)
    tp, _ = tp_size_rank(tp_group)
    check_layout(tp, tp, 1, cfg.num_heads, cfg.num_kv_heads)
    with torch.device(device):
        model = TransformerLM(cfg, tp_group, dtype)
    load_hf_weights(model, folder)
    return model, folder

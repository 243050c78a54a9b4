"""Hugging Face <-> native weights: each rank reads only its TP slices; export merges them.

A native parameter is the concatenation, along one dim, of per-rank chunks of one or more HF
tensors (fused qkv = [q | k | v] chunks, fused gate_up = [gate | up] chunks). The same table
drives import (slice) and export (gather and un-concatenate)."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..parallel.layers import padded_vocab_size, tp_size_rank
from .config import ArchConfig, ModelConfigError


@dataclass(frozen=True)
class Mapping:
    parts: tuple          # ((hf_name, full size along dim), ...)
    dim: object           # 0: rows split over TP, 1: columns split, None: replicated
    padded: int = 0       # the vocabulary padded to a multiple of TP (embedding / head rows)


def weight_map(cfg: ArchConfig, tp: int) -> dict:
    """native parameter name -> Mapping, for the whole model."""
    V = padded_vocab_size(cfg.vocab_size, tp)
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    m = {"embed.weight": Mapping((("model.embed_tokens.weight", cfg.vocab_size),), 0, V),
         "norm.weight": Mapping((("model.norm.weight", cfg.hidden_size),), None)}
    if not cfg.tie_word_embeddings:
        m["lm_head.proj.weight"] = Mapping((("lm_head.weight", cfg.vocab_size),), 0, V)
    for i in range(cfg.num_layers):
        hf, n = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            m[n + f"attn.qkv.{kind}"] = Mapping(((hf + f"self_attn.q_proj.{kind}", q),
                                                 (hf + f"self_attn.k_proj.{kind}", kv),
                                                 (hf + f"self_attn.v_proj.{kind}", kv)), 0)
        m[n + "attn.o.weight"] = Mapping(((hf + "self_attn.o_proj.weight", q),), 1)
        if cfg.o_bias:
            m[n + "attn.o.bias"] = Mapping(((hf + "self_attn.o_proj.bias", cfg.hidden_size),), None)
        if cfg.qk_norm:
            m[n + "attn.q_norm.weight"] = Mapping(((hf + "self_attn.q_norm.weight", cfg.head_dim),), None)
            m[n + "attn.k_norm.weight"] = Mapping(((hf + "self_attn.k_norm.weight", cfg.head_dim),), None)
        m[n + "mlp.gate_up.weight"] = Mapping(((hf + "mlp.gate_proj.weight", inter),
                                               (hf + "mlp.up_proj.weight", inter)), 0)
        m[n + "mlp.down.weight"] = Mapping(((hf + "mlp.down_proj.weight", inter),), 1)
        if cfg.mlp_bias:
            m[n + "mlp.gate_up.bias"] = Mapping(((hf + "mlp.gate_proj.bias", inter), (hf + "mlp.up_proj.bias", inter)), 0)
            m[n + "mlp.down.bias"] = Mapping(((hf + "mlp.down_proj.bias", cfg.hidden_size),), None)
        m[n + "input_norm.weight"] = Mapping(((hf + "input_layernorm.weight", cfg.hidden_size),), None)
        m[n + "post_attn_norm.weight"] = Mapping(((hf + "post_attention_layernorm.weight", cfg.hidden_size),), None)
    return m


class SafetensorsReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (single file or sharded)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", "pt") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.folder, self.files, self._open = folder, files, {}

    def _get(self, name: str):
        if name not in self.files:
            raise KeyError(f"{self.folder}: tensor '{name}' missing from the checkpoint")
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "pt")
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple:
        return tuple(self._get(name).get_shape())

    def equal(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether two tensors are equal, read a block of rows at a time."""
        return self.shape(a) == self.shape(b) and all(
            torch.equal(self.slice(a, 0, i, i + rows), self.slice(b, 0, i, i + rows))
            for i in range(0, self.shape(a)[0], rows))

    def slice(self, name: str, dim, start: int, stop: int) -> torch.Tensor:
        s = self._get(name)
        if dim is None:
            return s[:]
        return s[start:stop] if dim == 0 else s[:, start:stop]


def _rank_rows(mapping: Mapping, size: int, tp: int, rank: int):
    """This rank's [start, stop) of an HF tensor with `size` rows along the split dim, and the
    number of zero rows (vocabulary padding) that complete its shard."""
    per = (mapping.padded or size) // tp
    start = rank * per
    stop = max(min(start + per, size), start)  # the last ranks' shards may be padding only
    return start, stop, per - (stop - start)


def load_hf_weights(model: torch.nn.Module, folder: Path, names: dict = None) -> None:
    """Fill `model`'s parameters from an HF checkpoint; `names` maps native -> weight_map key
    (identity by default; pipeline stages pass their own names)."""
    cfg, group = model.cfg, model.tp_group
    tp, rank = tp_size_rank(group)
    table = weight_map(cfg, tp)
    reader = SafetensorsReader(folder)
    params = dict(model.named_parameters())
    names = names or {n: n for n in params}
    missing = set(params) - set(names)
    if missing:
        raise KeyError(f"no HF source for parameters {sorted(missing)[:5]}")
    # Every HF tensor must find a home in the whole model (the table is the whole model's on every
    # pipeline stage too). A tied model's own lm_head.weight may only be a copy of the embedding:
    # transformers unties a model whose checkpoint holds a different one. (Compared whole on every
    # rank, not by the rows one loads: every rank must come to the same verdict, or some would wait
    # for the others.)
    used = {hf_name for m in table.values() for hf_name, _ in m.parts}
    ignored = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    unused = [k for k in reader.files if k not in used and k not in ignored and not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"{folder}: checkpoint tensors the architecture does not use: {unused[:5]}")
    if ignored and ignored[0] in reader.files and not reader.equal("lm_head.weight", "model.embed_tokens.weight"):
        raise ModelConfigError(f"{folder}: config.json ties the output head to the embedding, but the checkpoint's "
                               "lm_head.weight differs from model.embed_tokens.weight (set tie_word_embeddings false)")
    # Whole tensors, checked before any is sliced: a slice of a larger tensor would fit the shard.
    for hf_shape in hf_shapes(model, names).values():
        for hf_name, shape in hf_shape.items():
            if reader.shape(hf_name) != shape:
                raise ModelConfigError(f"{folder}: tensor '{hf_name}' has shape {reader.shape(hf_name)}, config.json "
                                       f"gives {shape}")
    with torch.no_grad():
        for native, key in names.items():
            mapping = table[key]
            chunks = []
            for hf_name, size in mapping.parts:
                if mapping.dim is None:
                    chunks.append(reader.slice(hf_name, None, 0, 0))
                    continue
                start, stop, pad = _rank_rows(mapping, size, tp, rank)
                t = reader.slice(hf_name, mapping.dim, start, stop)
                if pad:
                    t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
                chunks.append(t)
            params[native].copy_(torch.cat(chunks, dim=mapping.dim or 0))


def hf_shapes(model: torch.nn.Module, names: dict = None) -> dict:
    """native parameter name -> {HF name: full shape} of the HF tensors it holds shards of, in
    parameter order, from the shapes alone (no communication). names: native name -> the name in
    weight_map's table (default: the same)."""
    tp, _ = tp_size_rank(model.tp_group)
    table = weight_map(model.cfg, tp)
    params = dict(model.named_parameters())
    out = {}
    for native, key in (names or {n: n for n in params}).items():
        mapping, shape = table[key], list(params[native].shape)
        out[native] = {}
        for hf_name, size in mapping.parts:
            if mapping.dim is not None:
                shape[mapping.dim] = size
            out[native][hf_name] = tuple(shape)
    return out


def gather_hf_tensors(model: torch.nn.Module, names: dict = None, skip=None):
    """Yield each native parameter's full HF tensors (HF name -> tensor), one parameter at a time,
    its TP shards merged on every TP rank: a collective over TP each, so every TP rank must iterate
    alike. names: as for hf_shapes. skip(HF names): True for a parameter to pass over."""
    group = model.tp_group
    tp, _ = tp_size_rank(group)
    table = weight_map(model.cfg, tp)
    for native, key in (names or {n: n for n, _ in model.named_parameters()}).items():
        mapping = table[key]
        if skip is not None and skip([hf_name for hf_name, _ in mapping.parts]):
            continue
        local = model.get_parameter(native).detach()
        if mapping.dim is None:
            yield {mapping.parts[0][0]: local.clone()}
            continue
        shards = [local] if tp == 1 else [torch.empty_like(local) for _ in range(tp)]
        if tp > 1:
            dist.all_gather(shards, local.contiguous(), group=group)
        sizes = [(mapping.padded or size) // tp for _, size in mapping.parts]
        pieces = [s.split(sizes, dim=mapping.dim) for s in shards]
        yield {hf_name: torch.cat([p[j] for p in pieces], dim=mapping.dim).narrow(mapping.dim, 0, size).clone()
               for j, (hf_name, size) in enumerate(mapping.parts)}


def write_hf_extras(folder: Path, cfg: ArchConfig, tokenizer, dtype, weight_map: dict = None,
                    total_size: int = None) -> None:
    """What a transformers folder holds besides its safetensors files: the config (with the
    weights' dtype), the tokenizer, and where the weights are sharded (weight_map: tensor name ->
    file) the index."""
    if weight_map is not None:
        index = {"metadata": {} if total_size is None else {"total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = cfg.hf_config
    hf.dtype = str(dtype).removeprefix("torch.")
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)

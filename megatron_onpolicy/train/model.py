"""The Llama-family model as a DeepSpeed `PipelineModule` of LayerSpecs, TP inside every stage.

Layer list: embedding, decoder layers, final norm, head. Between layers flows the tuple
(hidden, position_ids[, segment_ids]); the final norm drops the ids and the head returns
vocab-sharded logits, which the loss function reads on the last stage, or with the fused loss
(hidden, its vocab shard of the weight) for the loss to run the matmul chunk by chunk. Either way
the hidden state passes `copy_to_tp` in the head, whose backward sums its gradient over TP once.
With tied embeddings the embedding and the head are one `TiedLayerSpec`, so the first and last
stages each hold a copy whose gradients DeepSpeed sums. Stages are balanced by decoder-layer
count. P == 1 builds the same module (one stage), so there is only one layer list, one naming and
one loader. Activation recomputation (train/recompute.py) wraps layers of this list in
`deepspeed.checkpointing.checkpoint` and leaves the list, and so the names, as they are."""
import weakref
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint  # = deepspeed.checkpointing.checkpoint
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

from ..cli import device
from ..model.config import ArchConfig
from ..model.hf_io import weight_map
from ..model.llama import DecoderLayer, LMHead, RMSNorm, Rotary, layer_masks
from ..parallel.layers import VocabParallelEmbedding, tp_size_rank
from ..parallel.mappings import copy_to_tp
from ..parallel.state import ParallelLayoutError
from .recompute import Recompute


class EmbeddingPipe(VocabParallelEmbedding):
    def forward(self, inputs):
        input_ids, *ids = inputs
        return (super().forward(input_ids), *ids)


class StageMasks:
    """The attention of the micro-batch a stage is running, made once for all its decoder layers:
    packed spans read the segment ids on the host, a sync that per layer would stall a GPU stage
    once a layer. Keyed on the ids tensor itself (a weak reference): every micro-batch's forward
    gets new input tensors (DeepSpeed clones a stage's received inputs; a recomputed segment gets
    detached ones), so a stale entry is never taken for a new micro-batch."""

    def __init__(self, cfg: ArchConfig):
        self.cfg, self._ids, self._masks = cfg, None, None

    def __call__(self, position_ids, segment_ids=None):
        ids = position_ids if segment_ids is None else segment_ids
        if self._ids is None or self._ids() is not ids:
            self._ids, self._masks = weakref.ref(ids), layer_masks(self.cfg, position_ids, segment_ids)
        return self._masks


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ArchConfig, tp_group, index: int, masks: StageMasks, recompute_attention: bool = False):
        super().__init__(cfg, tp_group)
        self.cfg, self.index, self.masks, self.recompute_attention = cfg, index, masks, recompute_attention
        self.rotary = Rotary(cfg.hf_config)  # no parameters: each layer rebuilds cos / sin from the ids

    def forward(self, inputs):
        x, position_ids, *segment_ids = inputs
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = self.masks(position_ids, *segment_ids)[self.index]
        if self.recompute_attention and torch.is_grad_enabled():
            # DecoderLayer.forward, its attention sub-block kept as its input only and rerun in the backward
            x = x + checkpoint(self.attn, self.input_norm(x), cos, sin, mask)
            return (x + self.mlp(self.post_attn_norm(x)), position_ids, *segment_ids)
        return (super().forward(x, cos, sin, mask), position_ids, *segment_ids)


class FinalNormPipe(RMSNorm):
    def forward(self, inputs):
        return super().forward(inputs[0])


def tied_head(embedding: EmbeddingPipe, hidden):
    """The head that borrows the embedding matrix (TiedLayerSpec forward_fn)."""
    return F.linear(copy_to_tp(hidden, embedding.tp_group), embedding.weight)


def fused_tied_head(embedding: EmbeddingPipe, hidden):
    """tied_head for the fused loss: the matmul is left to the loss. The weight is the parameter
    itself, so its gradient adds to the embedding's (and DeepSpeed sums the tied copies under PP)."""
    return copy_to_tp(hidden, embedding.tp_group), embedding.weight


class FusedLMHead(LMHead):
    def forward(self, h):
        return copy_to_tp(h, self.tp_group), self.weight


class LlamaPipe(PipelineModule):
    """DeepSpeed's PipelineModule, running this stage's layers in the segments of a full
    recomputation (Recompute.groups): a recomputed segment through deepspeed.checkpointing.checkpoint,
    which keeps its input tuple only. (DeepSpeed's own activation_checkpoint_interval cuts the
    stage's list from its first function, the embedding on stage 0, not at decoder layers.)"""

    def __init__(self, *args, recompute: Recompute = Recompute(), **kwargs):
        super().__init__(*args, **kwargs)
        decoder = [i for i, f in enumerate(self.forward_funcs) if isinstance(f, DecoderLayerPipe)]
        self.recompute_segments = recompute.groups(decoder, len(self.forward_funcs))

    def forward(self, inputs):
        if not self.recompute_segments or not torch.is_grad_enabled():  # validation keeps nothing anyway
            return super().forward(inputs)
        x = inputs
        for start, stop, recomputed in self.recompute_segments:
            run = partial(_run_layers, self.forward_funcs[start:stop])
            x = checkpoint(run, *x) if recomputed else run(*x)
        return x


def _run_layers(funcs, *inputs):
    x = inputs
    for f in funcs:
        x = f(x)
    return x


def build_pipeline(cfg: ArchConfig, tp_group, topology, loss_fn, fused_loss: bool = False,
                   recompute: Recompute = Recompute()) -> PipelineModule:
    """fused_loss: the head hands (hidden, weight) to loss_fn instead of logits."""
    if cfg.num_layers < topology.get_dim("pipe"):
        raise ParallelLayoutError(f"pipeline-model-parallel-size {topology.get_dim('pipe')} exceeds the model's "
                                  f"{cfg.num_layers} decoder layers")
    embed_args = (cfg.vocab_size, cfg.hidden_size, tp_group)
    if cfg.tie_word_embeddings:
        first = TiedLayerSpec("embed", EmbeddingPipe, *embed_args, tied_weight_attr="weight")
        head = TiedLayerSpec("embed", EmbeddingPipe, *embed_args,
                             forward_fn=fused_tied_head if fused_loss else tied_head, tied_weight_attr="weight")
    else:
        first, head = LayerSpec(EmbeddingPipe, *embed_args), LayerSpec(FusedLMHead if fused_loss else LMHead, cfg,
                                                                       tp_group)
    selective = recompute.granularity == "selective"
    masks = StageMasks(cfg)  # one per process: the layers a stage builds share it
    specs = [first, *(LayerSpec(DecoderLayerPipe, cfg, tp_group, i, masks, selective) for i in range(cfg.num_layers)),
             LayerSpec(FinalNormPipe, cfg.hidden_size, cfg.rms_norm_eps), head]
    # no_grad: DeepSpeed broadcasts the tied weights in place at construction, which autograd
    # would otherwise record on the parameters. dynamic_shape: activations take the length of
    # each micro-batch's longest sample. On the rank's device: the 8 ranks of a GPU node build
    # their stage's shards on their GPUs, not in host memory first.
    with torch.no_grad(), torch.device(device()):
        pipe = LlamaPipe(specs, topology=topology, loss_fn=loss_fn, partition_method="type:DecoderLayerPipe",
                         dynamic_shape=True, recompute=recompute)
    # What model/hf_io reads off a model: its architecture and TP group.
    pipe.cfg, pipe.tp_group = cfg, tp_group
    _mark_tp_sharded(pipe)
    return pipe


def hf_names(pipe: PipelineModule) -> dict:
    """This stage's parameter names -> the whole model's native names (model/hf_io.weight_map)."""
    n = pipe.cfg.num_layers

    def native(name):
        head, rest = name.split(".", 1)
        if head == "tied_modules":  # tied_modules.embed.weight
            return "embed." + rest.split(".", 1)[1]
        i = int(head)  # the index in the layer list
        if i == 0:
            return "embed." + rest
        if i <= n:
            return f"layers.{i - 1}.{rest}"
        return ("norm." if i == n + 1 else "lm_head.") + rest

    return {name: native(name) for name, _ in pipe.named_parameters()}


def _mark_tp_sharded(pipe: PipelineModule) -> None:
    """DeepSpeed's gradient norm counts a parameter without this mark on TP rank 0 only (it is
    replicated); the sharded ones must be counted on every TP rank."""
    tp, _ = tp_size_rank(pipe.tp_group)
    table = weight_map(pipe.cfg, tp)
    params = dict(pipe.named_parameters())
    for name, native in hf_names(pipe).items():
        params[name].tensor_model_parallel = tp > 1 and table[native].dim is not None


class WholeModel(nn.Module):
    """P == 1: the one-stage pipeline plus its loss, for DeepSpeed's ordinary engine, which
    (unlike the pipeline engine) also allows ZeRO-2."""

    def __init__(self, pipe: PipelineModule):
        super().__init__()
        self.pipe = pipe

    def forward(self, inputs, labels):
        return self.pipe.loss_fn(self.pipe(inputs), labels)

"""Activation recomputation, with Megatron's flags, through `deepspeed.checkpointing.checkpoint`
(which restores the RNG states, the TP tracker's included, for the recomputation: parallel/random.py).

full: a recomputed block keeps only its input; its activations are rebuilt in the backward by
running it again. Which decoder layers, per pipeline stage as in Megatron: `uniform` recomputes
all of them, in groups of `num_layers` layers (one kept input a group), `block` recomputes the
first `num_layers` layers one by one and keeps the rest. The embedding, final norm and head are
never recomputed (the fused loss never keeps the head's logits: it works chunk by chunk).

selective: every layer recomputes its attention sub-block (QKV projection, RoPE, core attention,
output projection) and keeps the MLP's activations. Megatron's selective recomputes the core
attention alone, for its L x L probabilities; SDPA's fused kernels do not keep those, so what
is left to save in attention is its [tokens, heads x head_dim] intermediates (q, k, v, RoPE's,
the attention output), which only the sub-block as a whole gives without reaching into the
attention code. The numbers: docs/performance.md, "Recomputation"."""
from dataclasses import dataclass

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class Recompute:
    granularity: str = None  # None: keep every activation
    method: str = "uniform"
    num_layers: int = 1

    @classmethod
    def from_args(cls, args) -> "Recompute":
        return cls(args.recompute_granularity, args.recompute_method or "uniform", args.recompute_num_layers or 1)

    def groups(self, decoder: list, count: int) -> list:
        """Segments (start, stop, recomputed) covering a stage's `count` layer functions, of which
        `decoder` (contiguous indices) are decoder layers; empty when no layer is recomputed whole."""
        if self.granularity != "full":
            return []
        first, stop, n, k = decoder[0], decoder[-1] + 1, len(decoder), self.num_layers
        if self.method == "uniform":
            middle = [(first + i, first + min(i + k, n), True) for i in range(0, n, k)]
        else:
            middle = [(first + i, first + i + 1, True) for i in range(min(k, n))]
            if k < n:
                middle.append((first + k, stop, False))
        return [s for s in [(0, first, False), *middle, (stop, count, False)] if s[0] < s[1]]


def check_recompute_args(p, args) -> None:
    """Megatron's combinations; --recompute-activations is its short name for selective."""
    if args.recompute_activations:
        if args.recompute_granularity == "full":
            p.error("--recompute-activations is --recompute-granularity selective; it contradicts full")
        args.recompute_granularity = "selective"
    if args.recompute_granularity != "full":
        for flag in ("recompute_method", "recompute_num_layers"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} needs --recompute-granularity full")

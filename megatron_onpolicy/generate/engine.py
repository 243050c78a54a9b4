"""Batched, KV-cached generation on the tensor-parallel model.

Prompts of different lengths share one batch, left-padded: each row keeps its own position ids
(0 at its first real token) and pad keys are masked out, so a row generates exactly what it would
alone. One prefill forward over the prompts, or one per group of them (each prompt one causal
span, no [B, 1, L, L] mask), then one forward per new token (a [B, 1, 1, Lk] mask of the valid keys),
or on a GPU one replay of a CUDA graph per new token (DecodeState's cuda_graph)."""
from dataclasses import dataclass

import torch

from ..model.attention import left_padded_spans
from ..model.llama import attention_mask
from ..parallel.mappings import gather_from_tp
from .cache import ColumnView, RowsView, make_caches
from .sampling import sample, seeded_generator
from .stopping import end_reason

END_REASONS = ("eos", "max-length", "repeating", "stop-string")


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0: greedy
    top_p: float = 1.0
    top_k: int = 0             # 0: off
    max_new_tokens: int = 256
    eos_ids: tuple = ()        # a row stops after emitting any of these (kept in its tokens)
    repeat_window: int = 30    # repetition guard: stop when some window-token block occurs count times
    repeat_count: int = 5
    seed: int = 0              # the same on every TP rank, so every rank samples the same tokens

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"bad sampling parameters: temperature {self.temperature} (>= 0), top_p "
                             f"{self.top_p} (in (0, 1]), top_k {self.top_k} (>= 0), max_new_tokens "
                             f"{self.max_new_tokens} (>= 1)")


@dataclass
class Generation:
    tokens: list[int]  # new tokens, the stop token included
    end_reason: str    # one of END_REASONS


class DecodeState:
    """A batch of left-padded prompts in the model's KV caches; `prefill` then `step` each return
    the next-token logits [B, V] (full true vocabulary, fp32, identical on every TP rank).

    cuda_graph: the decode steps are replays of one CUDA graph, captured at the first step. A small
    model's step on a GPU is otherwise bound by the host launching each op's kernels
    (docs/performance.md). A captured step is the same kernels on the same buffers every time: it
    attends over every column of the cache under the mask rather than over the columns written so
    far, and its positions and cache column are device tensors that the step itself advances."""

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, cuda_graph: bool = False):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generation needs at least one prompt and no empty prompt")
        self.model = model
        self.device = next(model.parameters()).device
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"decoding in a CUDA graph needs the model on a CUDA device, not {self.device}")
        self.cuda_graph, self.graph = cuda_graph, None
        self.prompts = prompts
        batch, width = len(prompts), max(len(p) for p in prompts)
        self.max_len = width + max_new_tokens
        self.caches = make_caches(model, batch, self.max_len)
        # Position and validity of every cached key, per row (pads: position 0, invalid).
        self.key_pos = torch.zeros(batch, self.max_len, dtype=torch.long, device=self.device)
        self.key_valid = torch.zeros(batch, self.max_len, dtype=torch.bool, device=self.device)
        self.next_pos = torch.tensor([len(p) for p in prompts], device=self.device)
        self.length = 0  # cache columns written
        self.col = torch.zeros(1, dtype=torch.long, device=self.device)  # the column the next step writes

    def prefill(self, groups=None):
        """groups: lists of rows prefilled by separate forwards, each at its own prompts' width and
        right-aligned in the common cache, so that short prompts do not compute the pads of the
        longest (hinted decoding: the hinted stream, then the plain one). Default: one group."""
        width = max(len(p) for p in self.prompts)
        logits = None
        for rows in groups or [range(len(self.prompts))]:
            rows = list(rows)
            prompts = [self.prompts[r] for r in rows]
            w = max(len(p) for p in prompts)
            ids = torch.zeros(len(rows), w, dtype=torch.long, device=self.device)
            pos = torch.zeros_like(ids)
            for i, (r, p) in enumerate(zip(rows, prompts)):
                ids[i, w - len(p):] = torch.tensor(p, device=self.device)
                pos[i, w - len(p):] = torch.arange(len(p), device=self.device)
                self.key_valid[r, width - len(p):width] = True
            index = torch.tensor(rows, device=self.device)
            self.key_pos[index, width - w:width] = pos
            # Pad queries output zeros (not attention over nothing, which would be NaN and leak
            # through pad values as 0 * NaN); the cached pad keys are masked out in every step.
            spans = left_padded_spans([w - len(p) for p in prompts], w)
            views = [RowsView(cache, index, width) for cache in self.caches]
            out = last_position_logits(self.model, ids, pos, [spans.with_window(x) for x in self.model.cfg.windows], views)
            if logits is None:
                logits = out.new_empty(len(self.prompts), out.shape[-1])
            logits[index] = out
        self.length = width
        self.col.fill_(width)
        return logits

    def step(self, tokens):
        """Feed one token per row ([B]); rows that already stopped may be fed anything."""
        if self.length == self.max_len:
            raise RuntimeError(f"KV cache full: {self.max_len} positions allocated")
        self.length += 1
        if not self.cuda_graph:
            return self._step(tokens, self.length)
        if self.graph is None:
            return self._capture(tokens)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is overwritten by the next replay

    def _step(self, tokens, keys: int):
        """Write the step's keys and values at column `col`, attend over the first `keys` columns,
        then advance the positions and the column in place (a replay advances them too)."""
        pos = self.next_pos[:, None]
        self.key_pos.index_copy_(1, self.col, pos)
        self.key_valid.index_fill_(1, self.col, True)
        k_pos, k_valid = self.key_pos[:, :keys], self.key_valid[:, :keys]
        windows = self.model.cfg.windows
        by_window = {w: attention_mask(pos, k_pos, self.caches[0].k.dtype, w, k_valid) for w in set(windows)}
        views = [ColumnView(cache, self.col, keys) for cache in self.caches]
        logits = last_position_logits(self.model, tokens[:, None], pos, [by_window[w] for w in windows], views)
        self.next_pos += 1
        self.col += 1
        return logits

    def _capture(self, tokens):
        """The first step runs eagerly over all columns on a side stream (a graph's kernels must
        have run once: cuBLAS workspaces, lazy initialisation); capturing the same step records it
        without running it, so the caches, positions and column are advanced by one step only."""
        self.tokens = tokens.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step(self.tokens, self.max_len)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(self.tokens, self.max_len)
        return logits


class HostCopy:
    """Device tensors copied to the host without waiting for them.

    A decode loop copies a step's tokens, queues the next step's forward, then reads the copies:
    they were queued first, so reading waits for them alone, and the host checks every row's stop
    (EOS, repetition, stop strings, the splitter) while the device runs that forward. A plain
    `.tolist()` after the forward would wait for the forward too. Where all rows stop at once, the
    forward queued for them is wasted: one step a batch."""

    def __init__(self, *tensors):
        # Device-to-host with non_blocking lands in pinned memory: a true asynchronous copy.
        self.tensors = [t.to("cpu", non_blocking=True) for t in tensors]
        self.done = None
        if tensors[0].is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def lists(self):
        if self.done is not None:
            self.done.synchronize()
        return [t.tolist() for t in self.tensors]


def last_position_logits(model, ids, pos, masks, caches):
    """Full-vocab fp32 logits [B, V] of the last position: only that position's shard is gathered
    over TP, and padded vocabulary columns are dropped."""
    shard = model(ids, pos, masks=masks, caches=caches, last_only=True)[:, -1]
    return gather_from_tp(shard, model.tp_group)[:, :model.cfg.vocab_size].float()


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, generator=None,
             tokenizer=None, stop_strings=(), cuda_graph: bool = False) -> list[Generation]:
    """Continue every prompt (token ids) until EOS, a repetition loop, a stop string (needs
    `tokenizer`), or max_new_tokens. Collective calls inside the model: call on every TP rank.
    cuda_graph: see DecodeState."""
    state = DecodeState(model, prompts, params.max_new_tokens, cuda_graph)
    if generator is None:
        generator = seeded_generator(params.seed, state.device)
    outputs = [[] for _ in prompts]
    reasons = [None] * len(prompts)
    logits = state.prefill()
    for step in range(params.max_new_tokens):
        tokens = sample(logits, params.temperature, params.top_p, params.top_k, generator)
        host, last = HostCopy(tokens), step == params.max_new_tokens - 1
        if not last:
            logits = state.step(tokens)  # queued before the host reads the tokens: see HostCopy
        for i, t in enumerate(*host.lists()):
            if reasons[i] is None:
                outputs[i].append(t)
                reasons[i] = end_reason(outputs[i], params.eos_ids, params.repeat_window,
                                        params.repeat_count, tokenizer, stop_strings)
        if all(reasons) or last:
            break
    return [Generation(out, r or "max-length") for out, r in zip(outputs, reasons)]

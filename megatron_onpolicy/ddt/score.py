"""DDT statistics of whole rows under a (TP) model: the numbers `tools/ddt_score.py` reports.

Only the response (loss-masked) tokens count. z = sum phi / sqrt(sum var) is approximately
N(0, 1) for text the model itself would sample."""
import bisect
import math

import torch

from ..data import collate
from .fused import fused_stats
from .stats import TokenStats, vocab_parallel_stats

PHI_THRESHOLDS = (-1, -3, -5)
Z_BINS = (-5.0, -3.0, -1.0, 1.0, 3.0)


@torch.no_grad()
def score_batch(model, samples, pad_id, dump_tokens=False, fused=True, chunk_size=None):
    """One forward over `samples` (tokenized rows) -> one stats dict per sample, in order.

    fused: the head's matmul runs inside the statistics chunk by chunk (no [B, L, V/TP] logits)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(samples, pad_id).items()}
    args = (model.tp_group, model.cfg.vocab_size)
    keep = batch["loss_mask"] > 0
    if fused:  # only the response tokens reach the head
        hidden = model(batch["input_ids"], batch["position_ids"], hidden_only=True)[keep]
        stats = fused_stats(hidden, model.lm_head.weight, batch["targets"][keep], *args, chunk_size=chunk_size)
    else:
        logits = model(batch["input_ids"], batch["position_ids"])
        stats = vocab_parallel_stats(logits, batch["targets"], *args)
        stats = TokenStats(*(t[keep] for t in vars(stats).values()))
    # the response tokens of all rows in row order, split by row
    counts = keep.sum(-1).tolist()
    per_row = zip(*(t.double().cpu().split(counts) for t in (stats.phi, stats.logp, stats.entropy, stats.var)))
    rows = []
    for sample, n, (phi, logp, ent, var) in zip(samples, counts, per_row):
        row = {"index": sample.index, "num_tokens": n,
               "avg_phi": float(phi.mean()), "sum_phi": float(phi.sum()),
               "z": float(phi.sum() / math.sqrt(max(float(var.sum()), 1e-12))),
               "avg_logp": float(logp.mean()), "avg_entropy": float(ent.mean())}
        for t in PHI_THRESHOLDS:
            row[f"frac_phi_gt_{t}"] = float((phi > t).double().mean())
        if dump_tokens:  # response_ids: the scored tokens, one per phi (a conversation's assistant turns)
            row.update(prompt_ids=sample.input_ids[:sample.prompt_len],
                       response_ids=[t for t, m in zip(sample.input_ids, sample.loss_mask) if m],
                       phi=phi.tolist(), logp=logp.tolist(), entropy=ent.tolist())
        rows.append(row)
    return rows


def row_keys(dump_tokens=False) -> tuple:
    """The keys of the dicts `score_batch` returns."""
    keys = ("index", "num_tokens", "avg_phi", "sum_phi", "z", "avg_logp", "avg_entropy",
            *(f"frac_phi_gt_{t}" for t in PHI_THRESHOLDS))
    return keys + (("prompt_ids", "response_ids", "phi", "logp", "entropy") if dump_tokens else ())


def length_sorted_batches(items, batch_size, sample=lambda item: item):
    """Micro-batches of similar lengths (less padding); results are per row, so order is free.
    items: samples, or anything `sample` takes to its sample."""
    order = sorted(items, key=lambda item: len(sample(item).input_ids))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


class Summary:
    """Dataset-level summary, accumulated one row at a time (no list of rows is held): means over
    rows, the token-weighted mean phi, the z histogram."""

    MEANS = ("avg_phi", "z", "avg_logp", "avg_entropy")

    def __init__(self):
        self.rows = self.tokens = self.low_z = 0
        self.sum_phi = 0.0
        self.sums = dict.fromkeys(self.MEANS, 0.0)
        self.edges = (-math.inf,) + Z_BINS + (math.inf,)
        self.hist = [0] * (len(self.edges) - 1)

    def add(self, row: dict) -> None:
        self.rows += 1
        self.tokens += row["num_tokens"]
        self.sum_phi += row["sum_phi"]
        for key in self.MEANS:
            self.sums[key] += row[key]
        self.low_z += row["z"] < -3
        b = bisect.bisect_right(self.edges, row["z"]) - 1  # bins [lo, hi): +inf and nan fall in none
        if b < len(self.hist):
            self.hist[b] += 1

    def result(self) -> dict:
        n = self.rows
        return {"rows": n, "tokens": self.tokens,
                "mean_avg_phi": self.sums["avg_phi"] / n, "token_mean_phi": self.sum_phi / self.tokens,
                "mean_z": self.sums["z"] / n, "mean_avg_logp": self.sums["avg_logp"] / n,
                "mean_avg_entropy": self.sums["avg_entropy"] / n, "share_z_lt_-3": self.low_z / n,
                "z_histogram": {f"[{lo}, {hi})": c for lo, hi, c in zip(self.edges, self.edges[1:], self.hist)}}


def summarize(rows) -> dict:
    summary = Summary()
    for row in rows:
        summary.add(row)
    return summary.result()

"""Samples -> model batches: DP sharding, overlong samples, padding, packing.

The model at position t predicts token t+1, so a batch carries `targets[:, t] = input_ids[:, t+1]`
and `loss_mask[:, t]` = the sample's loss mask at t+1. Where position t has no next token of the
same sample (its last token, padding, the end of a packed sample) the target is -100, mask 0."""
from dataclasses import dataclass, replace

import torch

from .packing import FirstFit
from .tokenization import Sample

IGNORE = -100


def shard_indices(n: int, dp_rank: int, dp_size: int) -> range:
    """Rows of one data-parallel rank, strided so that ranks see rows of similar mix and count."""
    return range(dp_rank, n, dp_size)


def fit_length(sample: Sample, seq_length: int, mode: str) -> Sample | None:
    """The sample if it fits; else cut from the end ("truncate") or None ("drop"). A truncated
    sample with no target left is None as well; the caller counts what was dropped."""
    if mode not in ("truncate", "drop"):
        raise ValueError(f"overlong mode must be 'truncate' or 'drop', not {mode!r}")
    if len(sample.input_ids) <= seq_length:
        return sample
    if mode == "drop" or 1 not in sample.loss_mask[:seq_length]:
        return None
    return replace(sample, input_ids=sample.input_ids[:seq_length], loss_mask=sample.loss_mask[:seq_length])


def collate(samples: list[Sample], pad_id: int, seq_length: int | None = None) -> dict:
    """Right-padded [B, L] `input_ids`, `targets`, `loss_mask` (float), `position_ids`;
    L = seq_length, or the longest sample."""
    rows = [(s.input_ids, s.loss_mask, list(range(len(s.input_ids))), [1] * len(s.input_ids))
            for s in samples]
    batch = _pad_and_shift(rows, pad_id, seq_length)
    del batch["segment_ids"]
    return batch


@dataclass
class Packed:
    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int]  # restart at 0 for each sample
    segment_ids: list[int]   # 1, 2, 3, ... per sample (0 is padding, added by collate_packed)
    indices: list[int]       # row indices of the samples inside, in order


def pack(samples: list[Sample], seq_length: int, window: int = 64) -> list[Packed]:
    """Samples -> packs by bounded first-fit (packing.FirstFit), in the order the packs close."""
    fit, layout = FirstFit(seq_length, window), []
    for j, s in enumerate(samples):
        if len(s.input_ids) > seq_length:
            raise ValueError(f"row {s.index}: {len(s.input_ids)} tokens > seq_length {seq_length} (fit_length first)")
        layout += fit.add(j, len(s.input_ids))
    return [concat([samples[j] for j in ids]) for ids in layout + fit.finish()]


def concat(samples: list[Sample]) -> Packed:
    """Samples one after another in one row, positions restarting at 0 for each."""
    p = Packed([], [], [], [], [])
    for k, s in enumerate(samples, 1):
        p.segment_ids += [k] * len(s.input_ids)
        p.input_ids += s.input_ids
        p.loss_mask += s.loss_mask
        p.position_ids += range(len(s.input_ids))
        p.indices.append(s.index)
    return p


def collate_packed(packs: list[Packed], pad_id: int, seq_length: int | None = None) -> dict:
    """Like `collate`, plus `segment_ids` [B, L] so attention can be kept within each sample."""
    return _pad_and_shift([(p.input_ids, p.loss_mask, p.position_ids, p.segment_ids) for p in packs],
                          pad_id, seq_length)


def _pad_and_shift(rows, pad_id: int, seq_length: int | None) -> dict:
    """rows: (input_ids, loss_mask, position_ids, segment_ids) lists -> padded, shifted tensors."""
    longest = max(len(r[0]) for r in rows)
    length = seq_length or longest
    if longest > length:
        raise ValueError(f"a row has {longest} tokens > seq_length {length} (fit_length first)")
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    for b, (ids, m, pos, seg) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        mask[b, :n] = torch.tensor(m)
        position_ids[b, :n] = torch.tensor(pos)
        segment_ids[b, :n] = torch.tensor(seg)
    # Position t has a target only if token t+1 belongs to the same sample.
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    targets[:, :-1] = torch.where(same, input_ids[:, 1:], IGNORE)
    loss_mask = torch.zeros(shape)
    loss_mask[:, :-1] = (mask[:, 1:] * same).float()
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
            "position_ids": position_ids, "segment_ids": segment_ids}

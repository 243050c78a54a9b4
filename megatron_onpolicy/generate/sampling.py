"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-k, top-p.

Every tensor-parallel rank calls this on the same gathered logits with a generator seeded the same
way, so every rank picks the same token without a broadcast."""
import hashlib

import torch


def seeded_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_generator(seed: int, indices, device) -> torch.Generator:
    """A generator seeded by the run's seed and the batch's rows: a restarted run, or another
    data-parallel layout with the same batches, draws the same numbers."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, indices))}".encode()).digest()
    return seeded_generator(int.from_bytes(digest[:7], "little"), device)


def sample(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None):
    """One token id per row of `logits` [B, V] (logits or log-probabilities). temperature 0: greedy.

    The draw is the exponential race argmax(p / E), E ~ Exp(1): an exact sample from p that uses
    exactly B * V random numbers whatever p is, so a run is reproducible from its seed and the
    batch shape alone (which the hinted-decoding tests rely on)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z = _top_p(z, top_p)
    probs = z.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    # A draw of exactly 0 (one uniform in 2^24 in fp32; likely over B * V draws) would make a
    # zero-probability token 0/0 = NaN, which argmax picks; the smallest normal float cannot.
    race.clamp_(min=torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(dim=-1)


def _top_p(z, top_p: float):
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_z, order = z.sort(dim=-1, descending=True)
    probs = sorted_z.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_z = sorted_z.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)

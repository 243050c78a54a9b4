"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-k, top-p.

Every tensor-parallel rank calls this on the same gathered logits with a generator seeded the same
way, so every rank picks the same token without a broadcast."""
import hashlib

import torch

# Top-p looks for the nucleus among this many most likely tokens first (a partial sort), and sorts
# a whole row only where their mass falls short of top_p.
TOP_P_CANDIDATES = 64


def seeded_generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_generator(seed: int, indices, device) -> torch.Generator:
    """A generator seeded by the run's seed and the batch's rows: a batch of the same rows draws the
    same numbers in a restarted run or another data-parallel layout. (A restart regroups the rows
    left when it finds a batch only partly written, or another data-parallel size; those rows then
    get other, equally valid, draws.)"""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, indices))}".encode()).digest()
    return seeded_generator(int.from_bytes(digest[:7], "little"), device)


def sample(logits, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, generator=None):
    """One token id per row of `logits` [B, V] (logits or log-probabilities). temperature 0: greedy.

    The draw is the exponential race argmax(p / E), E = -log U ~ Exp(1) for U uniform in [0, 1): an
    exact sample from p that uses exactly B * V random numbers whatever p is, so a run is
    reproducible from its seed and the batch shape alone (which the hinted-decoding tests rely
    on). E > 0 (U < 1), so a zero-probability token scores 0 and never wins; U = 0 gives E = inf,
    a score of 0 too. (torch's `exponential_` draws the same law at about 4x the time on a CPU.)"""
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z = _top_p(z, top_p)
    probs = z.softmax(dim=-1)
    race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    return (probs / race).argmax(dim=-1)


def _top_p(z, top_p: float):
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one). At
    sampling temperatures the nucleus is a few tokens: the TOP_P_CANDIDATES most likely ones
    (topk, sorted) hold it unless their mass falls short of top_p, and only such rows are sorted
    whole (sorting 49152 logits took 30 ms for 16 rows on the 2-core CPU, topk 1 ms). On a GPU
    every row is sorted whole: choosing the rows there is a host sync each token, which stops the
    host queueing the next decode step while the device runs this one (engine.HostCopy)."""
    if z.is_cuda:
        return _sorted_top_p(z, top_p)
    top, order = z.topk(min(TOP_P_CANDIDATES, z.shape[-1]), dim=-1)
    kept = _nucleus(top, (top - z.logsumexp(dim=-1, keepdim=True)).exp(), top_p)
    out = torch.full_like(z, float("-inf")).scatter(-1, order, kept)
    short = kept.isfinite().all(dim=-1)  # every candidate kept: the nucleus may reach further
    if bool(short.any()):
        rows = short.nonzero().squeeze(-1)
        out[rows] = _sorted_top_p(z[rows], top_p)
    return out


def _sorted_top_p(z, top_p: float):
    sorted_z, order = z.sort(dim=-1, descending=True)
    return torch.empty_like(sorted_z).scatter_(-1, order, _nucleus(sorted_z, sorted_z.softmax(dim=-1), top_p))


def _nucleus(sorted_z, probs, top_p: float):
    """sorted_z (descending) with -inf past the point where the mass before a token reaches top_p."""
    return sorted_z.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))

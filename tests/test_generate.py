"""Generation and hinted decoding on the TP model: KV-cached greedy against a full recompute and
against transformers, TP=2 against TP=1, hinted decoding's limiting cases, stopping, templates,
and a smoke run of the real smollm2-135m."""
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

from megatron_onpolicy.generate import (END_REASONS, HintConfig, SamplingParams, TemplateError, generate,
                                        hinted_generate, is_repeating, lam_schedule, load_template, sample)
from megatron_onpolicy.generate import sampling
from megatron_onpolicy.generate.engine import DecodeState
from megatron_onpolicy.generate.hinted import write_analysis
from megatron_onpolicy.generate.templates import render
from megatron_onpolicy.model.loader import load_model
from megatron_onpolicy.parallel.mappings import gather_from_tp
from tests.dist_utils import run_distributed
from tests.test_model import VOCAB, tiny_config

MAX_NEW = 12


class IdTokenizer:
    """Decodes token t as "<t>", so a splitter or marker can name one token of a tiny model."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in re.findall(r"<(\d+)>", text)]


def save_tiny(kind, folder, init_range):
    """A tiny random HF model; a large init range makes greedy output varied instead of one token
    repeated (with the default 0.02 it loops at once, which the repetition test wants)."""
    cfg = tiny_config(kind)
    cfg.initializer_range = init_range
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {kind: (root / kind, save_tiny(kind, root / kind, 0.3)) for kind in ("llama-tied", "mistral-window")}


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def no_cache_greedy(model, prompt, max_new, eos):
    """Reference: the full sequence through the plain forward at every step, no cache, no padding."""
    ids = list(prompt)
    for _ in range(max_new):
        with torch.no_grad():
            logits = gather_from_tp(model(torch.tensor([ids])), model.tp_group)[0, -1, :model.cfg.vocab_size]
        ids.append(int(logits.argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["llama-tied", "mistral-window"])
def test_greedy_matches_recompute_and_transformers(tiny, kind):
    folder, hf = tiny[kind]
    model, _ = load_model(str(folder))
    eos = hf.generation_config.eos_token_id
    prompts = prompts_of([2, 40, 7])  # very different lengths in one left-padded batch
    params = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, eos_ids=(eos,))
    batched = generate(model, prompts, params)
    for prompt, got in zip(prompts, batched):
        alone = generate(model, [prompt], params)[0]
        ref = no_cache_greedy(model, prompt, MAX_NEW, eos)
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=eos)[0, len(prompt):].tolist()
        assert got.tokens == alone.tokens == ref == theirs
        assert got.end_reason == ("eos" if ref[-1] == eos else "max-length")


def test_prefill_in_groups_equals_one_batch(tiny):
    """Groups prefilled at their own widths, right-aligned in one cache, give the logits of the
    one left-padded prefill, and so do the decode steps over the shared cache after them."""
    folder, _ = tiny["mistral-window"]
    model, _ = load_model(str(folder))
    prompts = prompts_of([2, 40, 7, 33])
    tokens = torch.tensor([5, 6, 7, 8])
    with torch.no_grad():
        whole, grouped = DecodeState(model, prompts, 3), DecodeState(model, prompts, 3)
        for cache in grouped.caches:  # what a group does not write must not leak into a step
            cache.k.fill_(float("nan"))
            cache.v.fill_(float("nan"))
        got = [(grouped.prefill(groups=[[1, 3], [2, 0]]), whole.prefill())]
        got += [(grouped.step(tokens + k), whole.step(tokens + k)) for k in range(2)]
    for a, b in got:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_static_decode_step_equals_the_growing_one(tiny):
    """The step a CUDA graph captures (attention over every column of the cache under the mask,
    the column written and the positions as device tensors it advances) gives the logits, caches
    and key positions of the step over the columns written so far, up to a full cache: sliding
    windows, GQA, left padding, prefill groups."""
    folder, _ = tiny["mistral-window"]
    model, _ = load_model(str(folder))
    prompts = prompts_of([2, 40, 7, 33])
    tokens = torch.tensor([5, 6, 7, 8])
    new = 6
    with torch.no_grad():
        growing, static = DecodeState(model, prompts, new), DecodeState(model, prompts, new)
        for state in (growing, static):
            state.prefill(groups=[[1, 3], [2, 0]])
        for k in range(new):
            a, b = growing.step(tokens + k), static._step(tokens + k, static.max_len)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {k}: {m}")
    # The first layer's keys and values come from the tokens alone: the same bits; deeper layers'
    # inputs went through attention over more (masked) columns, so they may differ by rounding.
    assert torch.equal(growing.caches[0].k, static.caches[0].k) and torch.equal(growing.caches[0].v, static.caches[0].v)
    for x, y in zip(growing.caches, static.caches):
        torch.testing.assert_close(y.k, x.k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y.v, x.v, rtol=1e-5, atol=1e-6)
    for name in ("key_pos", "key_valid", "next_pos", "col"):
        assert torch.equal(getattr(growing, name), getattr(static, name)), name
    assert int(static.col) == static.max_len
    with pytest.raises(RuntimeError, match="KV cache full"):
        growing.step(tokens)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeState(model, prompts, new, cuda_graph=True)


HINTED_PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=MAX_NEW, seed=5)


def hinted_prompts():
    # Hinted prompts are longer (they carry the reference); the plain ones are the question alone.
    return prompts_of([18, 25], seed=1), prompts_of([5, 9], seed=2)


def _tp_worker(rank, world, folder):
    model, _ = load_model(str(folder), dist.group.WORLD if world > 1 else None)
    prompts = prompts_of([3, 30, 9])
    hinted, plain = hinted_prompts()
    out = {
        "greedy": [g.tokens for g in generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))],
        "sampled": [g.tokens for g in generate(model, prompts, SamplingParams(
            temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=MAX_NEW, seed=7))],
        "hinted": [(r.tokens, r.lams) for r in hinted_generate(
            model, IdTokenizer(), hinted, plain, HINTED_PARAMS, HintConfig(schedule="sigmoid", beta=10, center=0.6))],
    }
    if world > 1:  # every rank must have chosen the same tokens
        every = [None] * world
        dist.all_gather_object(every, out)
        assert all(o == out for o in every), "TP ranks disagree"
    return out


def test_tp2_equals_tp1(tiny):
    folder, _ = tiny["llama-tied"]  # vocab 101: rank 1 holds a padded column that must be dropped
    one = _tp_worker(0, 1, folder)
    two = run_distributed(_tp_worker, 2, folder)
    assert two["greedy"] == one["greedy"]
    assert two["sampled"] == one["sampled"]
    assert [t for t, _ in two["hinted"]] == [t for t, _ in one["hinted"]]
    for (_, lams2), (_, lams1) in zip(two["hinted"], one["hinted"]):
        assert lams2 == pytest.approx(lams1, abs=1e-5)
    lams = [x for _, l in one["hinted"] for x in l[1:]]
    assert 0.1 < sum(lams) / len(lams) < 0.9  # both streams really took part


@pytest.fixture(scope="module")
def llama(tiny):
    return load_model(str(tiny["llama-tied"][0]))[0]


def test_hinted_beta_zero_is_hinted_stream_alone(llama):
    hinted, plain = hinted_prompts()
    results = hinted_generate(llama, IdTokenizer(), hinted, plain, HINTED_PARAMS,
                              HintConfig(schedule="linear", beta=0.0, splitter=None))
    alone = generate(llama, hinted, HINTED_PARAMS)
    assert [r.tokens for r in results] == [g.tokens for g in alone]
    assert all(r.lams == [0.0] * MAX_NEW and r.mean_lam == 0.0 for r in results)
    assert all(r.end_reason == "max-length" and r.n_tokens == MAX_NEW for r in results)


def test_hinted_lam_one_is_plain_stream_after_first_token(llama):
    hinted, plain = hinted_prompts()
    results = hinted_generate(llama, IdTokenizer(), hinted, plain, HINTED_PARAMS,
                              HintConfig(schedule="piecewise", h1=-1.0, h2=-0.5, splitter=None))
    # The reference continues each plain prompt after the hinted stream's first token, with the
    # generator where hinted decoding left it after its first step (one [N, V] draw).
    generator = torch.Generator().manual_seed(HINTED_PARAMS.seed)
    sample(torch.zeros(len(hinted), VOCAB), HINTED_PARAMS.temperature, generator=generator)
    rest = SamplingParams(**{**vars(HINTED_PARAMS), "max_new_tokens": MAX_NEW - 1})
    ref = generate(llama, [p + r.tokens[:1] for p, r in zip(plain, results)], rest, generator=generator)
    assert [r.tokens[1:] for r in results] == [g.tokens for g in ref]
    assert all(r.lams == [0.0] + [1.0] * (MAX_NEW - 1) for r in results)
    # ... and the first token is the hinted stream's own.
    first = generate(llama, hinted, SamplingParams(**{**vars(HINTED_PARAMS), "max_new_tokens": 1}))
    assert [r.tokens[:1] for r in results] == [g.tokens for g in first]


def test_hinted_splitter_switches_to_plain_stream_next_step(llama):
    hinted, plain = hinted_prompts()
    free = hinted_generate(llama, IdTokenizer(), hinted, plain, HINTED_PARAMS, HintConfig(beta=0.0, splitter=None))
    token = free[0].tokens[3]
    results = hinted_generate(llama, IdTokenizer(), hinted, plain, HINTED_PARAMS,
                              HintConfig(beta=0.0, splitter=f"<{token}>"))
    switched = 0
    for before, r in zip(free, results):
        # The step that writes the splitter still mixes (lam 0 here); every later step is plain.
        k = before.tokens.index(token) + 1 if token in before.tokens else MAX_NEW
        assert r.tokens[:k] == before.tokens[:k]
        assert r.lams == [0.0] * k + [1.0] * (MAX_NEW - k)
        switched += k < MAX_NEW
    assert switched  # at least example 0 switched within the run


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_hinted_mixture_equals_two_transformers_forwards(tiny, llama, temperature):
    """Hinted decoding at 0 < lam < 1 against an independent computation: each step, two full
    transformers forwards (hinted and plain prompt + the tokens so far), lam from the hinted
    entropy, the log-space mixture renormalized, then greedy (or the same seeded top-p draw)."""
    _, hf = tiny["llama-tied"]
    hinted, plain = hinted_prompts()
    params = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=MAX_NEW, seed=3)
    results = hinted_generate(llama, IdTokenizer(), hinted, plain, params,
                              HintConfig(schedule="linear", beta=1.0, splitter=None))
    generator = torch.Generator().manual_seed(params.seed)
    outs, lams = [[] for _ in hinted], [[] for _ in hinted]
    for step in range(MAX_NEW):
        mixed = []
        for h_prompt, p_prompt, out, lam_row in zip(hinted, plain, outs, lams):
            with torch.no_grad():
                lh, lp = (hf(torch.tensor([prompt + out])).logits[0, -1].double().log_softmax(-1)
                          for prompt in (h_prompt, p_prompt))
            h = float(-(lh.exp() * lh).sum()) / math.log(VOCAB)
            lam_row.append(0.0 if step == 0 else min(max(h, 0.0), 1.0))
            mixed.append(((1 - lam_row[-1]) * lh + lam_row[-1] * lp).log_softmax(-1))
        for out, t in zip(outs, sample(torch.stack(mixed), temperature, params.top_p, generator=generator).tolist()):
            out.append(t)
    for r, out, lam_row in zip(results, outs, lams):
        assert r.tokens == out
        assert r.lams == pytest.approx(lam_row, abs=1e-4)
        assert all(0.05 < lam < 0.95 for lam in lam_row[1:])  # both streams weigh in at every later step


def test_lam_schedules():
    h = torch.tensor([0.0, 0.1, 0.3, 0.5, 1.0])
    assert lam_schedule(h, HintConfig(schedule="linear", beta=3.0)).tolist() == pytest.approx([0, 0.3, 0.9, 1, 1])
    assert lam_schedule(h, HintConfig(schedule="sigmoid", beta=10.0, center=0.3)).tolist() == pytest.approx(
        torch.sigmoid(10 * (h - 0.3)).tolist())
    assert lam_schedule(h, HintConfig(schedule="piecewise", h1=0.1, h2=0.5)).tolist() == pytest.approx(
        [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="unknown"):
        HintConfig(schedule="cosine")


def test_analysis_stage_stops_at_marker(llama):
    hinted, _ = hinted_prompts()
    greedy = generate(llama, hinted, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW))
    marker = greedy[0].tokens[4]
    prefixes = write_analysis(llama, IdTokenizer(), hinted, SamplingParams(),
                              HintConfig(analysis_marker=f"<{marker}>", analysis_max_tokens=MAX_NEW))
    for g, prefix in zip(greedy, prefixes):
        if marker in g.tokens:  # cut right after the marker
            assert prefix == g.tokens[:g.tokens.index(marker) + 1]
        else:  # the marker is appended when the analysis never writes it
            assert prefix == g.tokens + [marker]
    # An analysis that ends on EOS: the EOS is dropped before the appended marker (a token of the
    # second greedy analysis, past its start, that is not the marker, stands in for EOS).
    eos = next(t for t in greedy[1].tokens[2:] if t != marker and t not in greedy[1].tokens[:2])
    prefixes = write_analysis(llama, IdTokenizer(), hinted, SamplingParams(eos_ids=(eos,)),
                              HintConfig(analysis_marker=f"<{marker}>", analysis_max_tokens=MAX_NEW))
    ended_on_eos = 0
    for g, prefix in zip(greedy, prefixes):
        cut = next(k for k, t in enumerate(g.tokens + [marker]) if t in (marker, eos))
        if cut < len(g.tokens) and g.tokens[cut] == eos:
            assert prefix == g.tokens[:cut] + [marker]
            ended_on_eos += 1
        elif cut < len(g.tokens):
            assert prefix == g.tokens[:cut + 1]
        else:
            assert prefix == g.tokens + [marker]
    assert ended_on_eos


def test_repetition_guard(tmp_path):
    assert is_repeating([5, 1, 2, 1, 2, 1, 2], window=2, count=3)
    assert not is_repeating([5, 1, 2, 1, 2, 1], window=2, count=3)
    # One token repeated: the 30-token window at 0, 1, 2, 3, 4 is the 5th occurrence at token 34.
    assert first_stop([7] * 40, is_repeating) == 34
    # A tiny model with the default init loops under greedy decoding within a few tokens.
    save_tiny("qwen2", tmp_path / "m", 0.02)
    model, _ = load_model(str(tmp_path / "m"))
    prompt = prompts_of([8], seed=3)
    free = generate(model, prompt, SamplingParams(temperature=0.0, max_new_tokens=40, repeat_window=0))[0]
    expected = next(n for n in range(1, 41) if is_repeating(free.tokens[:n], 4, 3))
    guarded = generate(model, prompt, SamplingParams(temperature=0.0, max_new_tokens=40,
                                                     repeat_window=4, repeat_count=3))[0]
    assert guarded.end_reason == "repeating"
    assert guarded.tokens == free.tokens[:expected]


@pytest.mark.parametrize("config_eos, expected", [([2, 7, 9], (5, 2, 7, 9)), ([5, 9], (5, 9)), (9, (5, 9)),
                                                  (None, (5,))])
def test_stop_ids_are_the_tokenizers_eos_and_every_generation_config_eos(tmp_path, config_eos, expected):
    """Chat models list several EOS ids in generation_config.json (a list or an int): each one stops."""
    from megatron_onpolicy.generate import stop_token_ids

    tokenizer = type("Tok", (), {"eos_token_id": 5})()
    if config_eos is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": config_eos}))
    assert stop_token_ids(tokenizer, tmp_path) == expected
    assert stop_token_ids(tokenizer) == (5,)


def first_stop(tokens, check):
    return next((n for n in range(1, len(tokens) + 1) if check(tokens[:n])), None)


def brute_force_repeating(tokens, window=30, count=5):
    """DESIGN.md's rule read literally: some window-token block occurs count times in the output."""
    blocks = Counter(tuple(tokens[i:i + window]) for i in range(len(tokens) - window + 1))
    return bool(blocks) and max(blocks.values()) >= count


# Periods 1 and 2 (the windows overlap all but one or two tokens) and no prefix (the loop from the first token).
@pytest.mark.parametrize("period, prefix_len", [(1, 0), (1, 17), (2, 0), (2, 17), (7, 17), (31, 17), (45, 17),
                                                (80, 17), (200, 17)])
def test_repetition_guard_catches_any_period(period, prefix_len):
    g = torch.Generator().manual_seed(period)
    block = torch.randint(0, 49152, (period,), generator=g).tolist()
    prefix = torch.randint(0, 49152, (prefix_len,), generator=g).tolist()
    tokens = prefix + block * (5 + 150 // period)
    stop = first_stop(tokens, is_repeating)
    # The first token at which any 30-token block has occurred 5 times: 30 + 4 periods into the loop.
    assert stop == first_stop(tokens, brute_force_repeating) == len(prefix) + 30 + 4 * period


def test_repetition_guard_leaves_ordinary_text_alone():
    from megatron_onpolicy.model.loader import load_tokenizer
    from megatron_onpolicy.model.hub import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    # 128 solutions from 9 templates: the same sentences over and over, only the numbers differ.
    rows = (Path(__file__).resolve().parents[1] / "data" / "math_sft.jsonl").read_text().splitlines()
    text = "\n".join(json.loads(line)["response"] for line in rows)
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    assert len(tokens) > 3000
    assert not brute_force_repeating(tokens) and first_stop(tokens, is_repeating) is None


def test_sampling_limits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, 0.0), greedy)
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample(logits, 1.0, top_p=1e-6, generator=g), greedy)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        picked = sample(logits, 2.0, top_k=3, generator=g)
        assert (top3 == picked[:, None]).any(-1).all()


def reference_nucleus(z, top_p):
    """[B, V] bool: the tokens top-p keeps, found in float64 by sorting each row in full."""
    z = z.double()
    order = z.argsort(dim=-1, descending=True)
    probs = z.gather(-1, order).softmax(dim=-1)
    keep_sorted = probs.cumsum(dim=-1) - probs < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def test_top_p_keeps_the_nucleus(monkeypatch):
    """Top-p through the most likely candidates, and the whole-row sort where they fall short (16
    candidates here, so the flat rows do), keeps exactly the tokens a float64 sort of each row
    keeps, at their logits; rows from peaked to flat, and rows cut by top-k first. So does the
    whole-row sort of every row, the path on a GPU."""
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 16)
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-1, 1.5, 48)[:, None]
    z = torch.randn(48, 1000, generator=g) * scale
    z[:8] = z[:8].masked_fill(z[:8] < z[:8].topk(10, dim=-1).values[:, -1:], float("-inf"))
    for top_p in (0.5, 0.9, 0.99):
        keep = reference_nucleus(z, top_p)
        sizes = keep.sum(-1)
        assert (sizes > 16).any() and (sizes <= 16).any()  # both paths
        for got in (sampling._top_p(z, top_p), sampling._sorted_top_p(z, top_p)):
            assert torch.equal(got.isfinite(), keep), top_p
            assert torch.equal(got[keep], z[keep])


@pytest.mark.parametrize("candidates", [3, 4])
def test_sample_draws_the_nucleus_distribution(monkeypatch, candidates):
    """The race draws each token of the temperature / top-p distribution at its probability: the
    frequencies of 200 000 draws lie within 5 standard errors, none outside the nucleus (3 tokens
    of 6 here: with 4 candidates they hold it, with 3 the row is sorted whole)."""
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    p = (logits / 0.7).double().softmax(-1)
    keep = reference_nucleus(logits[None] / 0.7, 0.9)[0]
    q = torch.where(keep, p, 0.0) / p[keep].sum()
    n = 200_000
    draws = sample(logits.expand(n, -1), 0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert keep.sum() == 3 and (freq[~keep] == 0).all()
    assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt()).all(), (freq, q)


@pytest.mark.parametrize("temperature, top_k, top_p", [(2.5, 0, 0.6), (1.0, 3, 0.8)])
def test_sample_warps_in_transformers_order(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, as transformers' warpers chain them: the tokens drawn
    are the set its warped logits keep, at their frequencies within 5 standard errors. The cases
    tell the orders apart: top-p before the temperature keeps 2 tokens, not 3 (first case); top-p
    before top-k keeps 3, not 2 (second: top-k renormalizes the nucleus's mass over 3 tokens)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    warped = logits.double()[None]
    for warper in warpers + [TopPLogitsWarper(top_p)]:
        warped = warper(torch.zeros(1, 1, dtype=torch.long), warped)
    q = warped[0].softmax(-1)
    keep = q > 0
    assert keep.tolist() == [True] * (3 if top_k == 0 else 2) + [False] * (3 if top_k == 0 else 4)
    n = 200_000
    draws = sample(logits.expand(n, -1), temperature, top_p=top_p, top_k=top_k,
                   generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert (freq[~keep] == 0).all(), freq
    assert ((freq - q).abs() <= 5 * (q * (1 - q) / n).sqrt()).all(), (freq, q)


def test_templates(tmp_path):
    for name in ("hint", "analysis"):
        text = load_template(None, name)
        assert "{question}" in text and "{answer}" in text
    bad = tmp_path / "bad.txt"
    bad.write_text("Question: {question}\nSolve it.\n")
    with pytest.raises(TemplateError, match=r"bad\.txt.*\{answer\}"):
        load_template(bad, "hint")
    with pytest.raises(TemplateError, match="does not exist"):
        load_template(tmp_path / "missing.txt", "hint")
    with pytest.raises(TemplateError, match="is a folder"):
        load_template(tmp_path, "hint")
    bad.write_bytes(b"Question: {question} {answer}\xff\n")
    with pytest.raises(TemplateError, match=r"bad\.txt' is not UTF-8 \(invalid start byte at byte 29\)"):
        load_template(bad, "hint")
    out = render("Q: {question}\nA: {answer}\nEnd with \\boxed{}.", "what is {answer}?", "42")
    assert out == "Q: what is {answer}?\nA: 42\nEnd with \\boxed{}."


def test_prompt_ids_are_transformers_chat_template_with_generation_prompt():
    """Both streams' prompts end with the assistant header (the model answers, it does not continue
    the user turn): the ids of transformers' own template text, rendered then tokenized."""
    from megatron_onpolicy.generate.templates import hinted_prompt_ids, plain_prompt_ids
    from megatron_onpolicy.model.hub import resolve_model_path

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    question, answer = "What is 7 times 6?", "7 x 6 = 42. \\boxed{42}"

    def reference(content):
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        return tok(text, add_special_tokens=False).input_ids

    template = load_template(None, "hint")
    # neither text holds a placeholder, so two plain replaces do what the one-pass render does
    hinted_text = template.replace("{question}", question).replace("{answer}", answer)
    assert plain_prompt_ids(tok, question) == reference(question)
    assert hinted_prompt_ids(tok, template, question, answer) == reference(hinted_text)
    assert tok.decode(plain_prompt_ids(tok, question)).endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_smoke():
    from megatron_onpolicy.generate import hinted_decode, stop_token_ids
    from megatron_onpolicy.generate.templates import plain_prompt_ids
    from megatron_onpolicy.model.loader import load_tokenizer

    data = Path(__file__).resolve().parents[1] / "data" / "math_sft.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()[:2]] if data.exists() else [
        {"prompt": "What is 12 + 30?", "response": "12 + 30 = 42. \\boxed{42}"},
        {"prompt": "What is 7 times 6?", "response": "7 x 6 = 42. \\boxed{42}"}]
    model, folder = load_model("smollm2-135m")
    tokenizer = load_tokenizer(folder)
    eos = stop_token_ids(tokenizer, folder)
    assert eos
    params = SamplingParams(temperature=0.0, max_new_tokens=48, eos_ids=eos)
    outs = generate(model, [plain_prompt_ids(tokenizer, r["prompt"]) for r in rows], params)
    for g in outs:
        assert g.end_reason in END_REASONS and 0 < len(g.tokens) <= 48
        assert tokenizer.decode(g.tokens, skip_special_tokens=True).strip()
    hinted = hinted_decode(model, tokenizer, [rows[0]["prompt"]], [rows[0]["response"]],
                           SamplingParams(temperature=0.3, top_p=0.95, max_new_tokens=24, eos_ids=eos),
                           HintConfig(analysis=True, analysis_max_tokens=16))[0]
    assert hinted.end_reason in ("eos", "max-length", "repeating") and hinted.n_tokens == len(hinted.tokens)
    assert hinted.text.strip() and 0.0 <= hinted.mean_lam <= 1.0 and hinted.lams[0] == 0.0
    assert "# CoT" in hinted.analysis

"""Hinted decoding (DESIGN.md section 2): the model rewrites a reference answer in its own words.

Each example is two rows of one batch: the hinted stream (prompt = question + reference answer)
and the plain stream (prompt = the question alone, as in training). Every step runs one forward
for both, mixes the two next-token distributions,

    log m = (1 - lam) * log p_hint + lam * log p_plain   (then renormalized),

samples one token from m and appends it to both streams. lam = f(H_hint / log V): where the hinted
stream is unsure, the model's own plain distribution decides."""
import math
from dataclasses import dataclass, field

import torch

from .engine import DecodeState, HostCopy, SamplingParams, generate
from .sampling import sample, seeded_generator
from .stopping import end_reason, text_appeared
from .templates import hinted_prompt_ids, load_template, plain_prompt_ids

SCHEDULES = ("linear", "sigmoid", "piecewise")


@dataclass
class HintConfig:
    schedule: str = "linear"    # lam = f(h), h = H_hint / log V: one of SCHEDULES
    beta: float = 3.0           # linear: clamp(beta * h, 0, 1); sigmoid: sigmoid(beta * (h - center))
    center: float = 0.5         # sigmoid midpoint
    h1: float = 0.3             # piecewise: lam = 0 below h1, 1 above h2, linear between
    h2: float = 0.7
    splitter: str | None = "\\boxed{"  # once written, the plain stream alone decides (None: never)
    analysis: bool = False      # first stage: the hinted stream analyses the reference (greedy)
    analysis_marker: str = "# CoT"  # ... up to this marker, which then starts its response
    analysis_max_tokens: int = 256

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lam schedule '{self.schedule}' unknown (choose from {', '.join(SCHEDULES)})")
        if self.schedule == "piecewise" and not self.h1 < self.h2:
            raise ValueError(f"piecewise lam schedule needs h1 < h2, got h1={self.h1} h2={self.h2}")


@dataclass
class HintedResult:
    text: str           # the response, stop token excluded
    tokens: list[int]   # the response's token ids, stop token included
    end_reason: str     # "eos" | "max-length" | "repeating"
    n_tokens: int
    mean_lam: float     # 0: all hinted stream, 1: all plain stream
    lams: list[float] = field(repr=False)  # lam of every step, for inspection
    analysis: str | None = None  # the first stage's text (marker included), when it ran


def lam_schedule(h, cfg: HintConfig):
    """lam for normalized entropies h (a tensor, values in [0, 1])."""
    if cfg.schedule == "linear":
        return (cfg.beta * h).clamp(0.0, 1.0)
    if cfg.schedule == "sigmoid":
        return torch.sigmoid(cfg.beta * (h - cfg.center))
    return ((h - cfg.h1) / (cfg.h2 - cfg.h1)).clamp(0.0, 1.0)


@torch.no_grad()
def hinted_generate(model, tokenizer, hinted_prompts: list[list[int]], plain_prompts: list[list[int]],
                    params: SamplingParams, hint: HintConfig, generator=None,
                    cuda_graph: bool = False) -> list[HintedResult]:
    """Hinted decoding from prompt ids, one result per (hinted, plain) pair.

    `tokenizer` only decodes (splitter detection, result text). Call on every TP rank.
    cuda_graph: the decode steps replay one CUDA graph (engine.DecodeState)."""
    if len(hinted_prompts) != len(plain_prompts):
        raise ValueError(f"{len(hinted_prompts)} hinted prompts but {len(plain_prompts)} plain prompts")
    n = len(hinted_prompts)
    # Rows 2i / 2i+1: the hinted / plain stream of example i.
    state = DecodeState(model, [p for pair in zip(hinted_prompts, plain_prompts) for p in pair],
                        params.max_new_tokens, cuda_graph)
    if generator is None:
        generator = seeded_generator(params.seed, state.device)
    log_v = math.log(model.cfg.vocab_size)
    outputs, lams = [[] for _ in range(n)], [[] for _ in range(n)]
    reasons = [None] * n
    # The splitter has been written: on the host, and on the device for the mixing (written once a row).
    switched, plain_only = [False] * n, torch.zeros(n, dtype=torch.bool, device=state.device)
    logits = state.prefill(groups=[range(0, 2 * n, 2), range(1, 2 * n, 2)])  # each stream at its own width
    for step in range(params.max_new_tokens):
        logp = logits.log_softmax(dim=-1)
        logp_hint, logp_plain = logp[0::2], logp[1::2]
        entropy = -(logp_hint.exp() * logp_hint).sum(dim=-1)  # of the untempered hinted stream
        lam = torch.zeros(n, device=state.device) if step == 0 else lam_schedule(entropy / log_v, hint)
        lam = torch.where(plain_only, 1.0, lam)
        mixed = ((1 - lam)[:, None] * logp_hint + lam[:, None] * logp_plain).log_softmax(dim=-1)
        tokens = sample(mixed, params.temperature, params.top_p, params.top_k, generator)
        host, last = HostCopy(tokens, lam), step == params.max_new_tokens - 1
        if not last:
            logits = state.step(tokens.repeat_interleave(2))  # queued before the host reads: HostCopy
        for i, (t, l) in enumerate(zip(*host.lists())):
            if reasons[i] is not None:
                continue
            outputs[i].append(t)
            lams[i].append(l)
            reasons[i] = end_reason(outputs[i], params.eos_ids, params.repeat_window, params.repeat_count)
            # The switch applies from the next step's mixing on; it is sticky.
            if hint.splitter and not switched[i] and text_appeared(tokenizer, outputs[i], hint.splitter):
                switched[i] = True
                plain_only[i] = True
        if all(reasons) or last:
            break
    return [HintedResult(text=_response_text(tokenizer, out, params.eos_ids), tokens=out,
                         end_reason=r or "max-length", n_tokens=len(out),
                         mean_lam=sum(l) / len(l), lams=l)
            for out, r, l in zip(outputs, reasons, lams)]


def write_analysis(model, tokenizer, prompts: list[list[int]], params: SamplingParams,
                   hint: HintConfig, cuda_graph: bool = False) -> list[list[int]]:
    """First stage: greedy analysis of the reference, as token ids ending with the marker.

    An analysis that stops without writing the marker (EOS, length, loop) gets it appended, so the
    hinted stream always moves on to its solution."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=hint.analysis_max_tokens,
                            eos_ids=params.eos_ids, repeat_window=params.repeat_window,
                            repeat_count=params.repeat_count, seed=params.seed)
    prefixes = []
    for g in generate(model, prompts, greedy, tokenizer=tokenizer, stop_strings=(hint.analysis_marker,),
                      cuda_graph=cuda_graph):
        ids = g.tokens
        if g.end_reason != "stop-string":
            ids = ids[:-1] if g.end_reason == "eos" else ids
            ids = ids + tokenizer.encode(f"\n{hint.analysis_marker}\n", add_special_tokens=False)
        prefixes.append(ids)
    return prefixes


def hinted_decode(model, tokenizer, questions: list[str], answers: list[str], params: SamplingParams,
                  hint: HintConfig, hint_template: str = None, analysis_template: str = None,
                  generator=None, cuda_graph: bool = False) -> list[HintedResult]:
    """Hinted decoding of (question, reference answer) pairs; templates default to the packaged
    ones. With hint.analysis the hinted stream's response starts with its analysis (written under
    the analysis template), placed right after the hinted prompt's generation prompt."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    hint_template = hint_template or load_template(None, "hint")
    hinted = [hinted_prompt_ids(tokenizer, hint_template, q, a) for q, a in zip(questions, answers)]
    plain = [plain_prompt_ids(tokenizer, q) for q in questions]
    analyses = [None] * len(questions)
    if hint.analysis:
        analysis_template = analysis_template or load_template(None, "analysis")
        prefixes = write_analysis(model, tokenizer, [hinted_prompt_ids(tokenizer, analysis_template, q, a)
                                                     for q, a in zip(questions, answers)], params, hint,
                                  cuda_graph)
        hinted = [h + p for h, p in zip(hinted, prefixes)]
        analyses = [tokenizer.decode(p, skip_special_tokens=False) for p in prefixes]
    results = hinted_generate(model, tokenizer, hinted, plain, params, hint, generator, cuda_graph)
    for r, a in zip(results, analyses):
        r.analysis = a
    return results


def _response_text(tokenizer, tokens: list[int], eos_ids) -> str:
    body = tokens[:-1] if tokens and tokens[-1] in eos_ids else tokens
    return tokenizer.decode(body, skip_special_tokens=False)

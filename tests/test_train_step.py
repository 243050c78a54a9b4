"""What the trainer applies: one optimizer step of each objective (ce, dft, idft, eaft), fused and
unfused, in several layouts (T, P, DP, gradient accumulation), tied and untied heads, compared
weight by weight with a dense single-process step written independently of megatron_onpolicy.ddt:
transformers' own model (AutoModelForCausalLM), the loss from log_softmax by hand, torch's AdamW.
Each run then validates on its rows, which must give the updated reference model's cross-entropy.

Adam's first step is lr * g / (|g| + eps): with eps far above every |g| it is lr / eps * g, linear
in the gradient, so a wrongly scaled or weighted loss moves the weights differently (with the
default eps it would be about lr * sign(g) and hide such errors). lr is set from the objective's
mean token weight (p_y ** gamma is tiny on a random model) so that every step is well above fp32
resolution. Clipping is kept out of the way. Weight decay shrinks the 2-D weights by 1 % and
leaves the norms alone, and IDFT runs with beta, gamma_min and gamma_max other than their defaults,
so that a flag the trainer ignored, or applied to other parameters, moves the weights differently.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_onpolicy.data import collate, read_rows, tokenize_row
from megatron_onpolicy.train.args import parse_args
from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

ROWS = 4      # one global batch: the first iteration sees every row
EPS = 1e4  # above every |g|: the update lr * g / (|g| + eps) is lr / eps * g
DECAY = 1e-2  # lr * weight decay: AdamW multiplies each decayed weight by 1 - DECAY
IDFT = {"beta": 2.0, "gamma_min": 0.5, "gamma_max": 1.5}
# name: (processes, T, P, micro-batch, loss, fused, model, ZeRO stage); global batch ROWS,
# DP = processes / (T * P). At T = 2 each of the four heads (tied or not, fused or not) runs, each
# of which must sum the hidden state's gradient over TP (train/model.py's copy_to_tp). Models: a
# Llama with a tied or an untied head, a Qwen3 (tied), whose q / k norms each TP rank applies to
# its own heads; a 3-layer tied Llama, one layer a stage at P = 3, whose middle stage reads no
# data and holds neither end of the tied embedding. At stage 0 and DP = 1 DeepSpeed's gradient
# all-reduce is skipped (train/engine.py); at DP = 2 it must not be.
RUNS = {
    "ce-1-fused": (0, 1, 1, 4, "ce", True, "tied", 1),
    "idft-gas4-fused-zero0": (0, 1, 1, 1, "idft", True, "tied", 0),
    "dft-gas2-unfused": (0, 1, 1, 2, "dft", False, "tied", 1),
    "eaft-tp2-fused": (2, 2, 1, 4, "eaft", True, "tied", 1),
    "idft-tp2-unfused-untied": (2, 2, 1, 2, "idft", False, "untied", 1),
    "idft-pp2-fused-untied-zero0": (2, 1, 2, 2, "idft", True, "untied", 0),
    "eaft-dp2-gas2-unfused": (2, 1, 1, 1, "eaft", False, "tied", 1),
    "dft-dp2-fused-zero0": (2, 1, 1, 2, "dft", True, "tied", 0),
    "idft-tp2-fused-untied": (2, 2, 1, 4, "idft", True, "untied", 1),
    "ce-tp2-unfused-qwen3": (2, 2, 1, 4, "ce", False, "qwen3", 1),
    "dft-pp3-gas4-fused": (3, 1, 3, 1, "dft", True, "tied3", 1),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("step")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:ROWS]))
    return SimpleNamespace(tmp=tmp, train=tmp / "train.jsonl",
                           models={"tied": peaked(make_tiny_model(tmp / "tied", layers=2)),
                                   "untied": peaked(make_tiny_model(tmp / "untied", layers=2, tied=False, seed=1)),
                                   "qwen3": peaked(make_tiny_model(tmp / "qwen3", layers=2, seed=2, kind="qwen3")),
                                   "tied3": peaked(make_tiny_model(tmp / "tied3", layers=3, seed=3))})


def peaked(folder):
    """Logits with a spread like a trained model's: at random init every p_y is about 1 / V, so the
    dft / idft / eaft weights would be near constants and their gradients tiny."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4)
    model.save_pretrained(folder)
    return folder


def step_flags(lr) -> tuple:
    """The optimizer and objective flags of a run that dense_step's reference matches."""
    return ("--lr", lr, "--adam-eps", EPS, "--weight-decay", DECAY / lr, "--lr-decay-style", "constant",
            "--idft-beta", IDFT["beta"], "--idft-gamma-min", IDFT["gamma_min"], "--idft-gamma-max", IDFT["gamma_max"])


def train_one_step(s, name, lr):
    n, tp, pp, micro, kind, fused, model, zero = RUNS[name]
    out = s.tmp / name
    result = launch(n, "--model", s.models[model], "--train-data", s.train, "--seq-length", 256,
                    "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                    "--micro-batch-size", micro, "--global-batch-size", ROWS, "--train-iters", 1,
                    "--loss", kind, *(("--loss-chunk-size", 37) if fused else ("--no-fused-loss",)),
                    # clipping out of the way: a threshold never reached (the norm is still computed and
                    # reported), or none for fp32 at stage 0 under PP, refused there (train/ds_config.py)
                    *step_flags(lr), "--clip-grad", 1e9 if zero or pp == 1 else 0,
                    "--valid-data", s.train,  # validated after the step
                    "--save", out, "--export-hf", out / "hf",
                    "--deepspeed_config", ROOT / "ds_configs" / f"zero{zero}_fp32.json",
                    runner="torchrun")  # a free port of its own: other jobs may hold deepspeed's default
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The export writes one safetensors file per pipeline stage.
    trained = {k: v for f in sorted((out / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    return trained, read_metrics(out)[0]


def dense_step(folder, train, kind):
    """The reference: every row in one batch, the mean over all loss tokens, one AdamW step that
    decays the 2-D weights only (Megatron's rule). -> (updated weights, (loss, gradient norm), lr)"""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    b = collate([tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(read_rows(train))], 0)
    logq = model(b["input_ids"]).logits.double().log_softmax(-1)  # right padding: real positions unaffected
    logp = logq.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logq.exp() * logq).sum(-1)
    with torch.no_grad():  # DESIGN.md section 2, the weights detached; lam 1
        gamma = torch.exp(-(logp + entropy) / IDFT["beta"]).clamp(IDFT["gamma_min"], IDFT["gamma_max"])
        w = {"ce": torch.ones_like(logp), "dft": logp.exp(), "idft": logp.exp() ** gamma,
             "eaft": entropy / math.log(model.config.vocab_size)}[kind]
    mask = b["loss_mask"].double()
    loss = -(mask * w * logp).sum() / mask.sum()
    loss.backward()
    norm = float(sum(p.grad.double().square().sum() for p in model.parameters()).sqrt())
    lr = 10 * EPS / float((mask * w).sum() / mask.sum())  # updates of about 10 x the CE gradient
    params = list(model.parameters())
    torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": DECAY / lr},
                       {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}], lr=lr, eps=EPS).step()
    return {k: v.detach() for k, v in model.state_dict().items()}, (loss.item(), norm), lr


def dense_ce(folder, weights, train) -> float:
    """The mean cross-entropy over every loss token of `train`, for the model with `weights`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model.load_state_dict(weights)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    b = collate([tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(read_rows(train))], 0)
    with torch.no_grad():
        logq = model(b["input_ids"]).logits.double().log_softmax(-1)
    logp = logq.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = b["loss_mask"].double()
    return float(-(mask * logp).sum() / mask.sum())


@pytest.fixture(scope="module")
def steps(setup):
    """name -> (exported weights, first metrics record, reference weights, (reference loss, gradient
    norm, validation loss after the step)), run on first use; references are shared by the runs of
    the same loss and model."""
    references, results = {}, {}

    def get(name):
        kind, model = RUNS[name][4], RUNS[name][6]
        if (kind, model) not in references:
            ref, (loss, norm), lr = dense_step(setup.models[model], setup.train, kind)
            references[kind, model] = ref, (loss, norm, dense_ce(setup.models[model], ref, setup.train)), lr
        if name not in results:
            ref, ref_numbers, lr = references[kind, model]
            results[name] = (*train_one_step(setup, name, lr), ref, ref_numbers)
        return results[name]
    return get


@pytest.mark.parametrize("name", RUNS)
def test_one_step_updates_the_weights_like_the_dense_reference(setup, steps, name):
    trained, metrics, ref, (ref_loss, ref_norm, ref_valid) = steps(name)
    model = RUNS[name][6]
    tied = model != "untied"
    start = load_file(setup.models[model] / "model.safetensors")
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    # validation, after the step: every stage, a middle one included, ran the updated model
    assert metrics["valid_loss"] == pytest.approx(ref_valid, rel=1e-5), name
    assert metrics["valid_tokens"] == metrics["loss_tokens"], name
    # the gradient norm clipping uses, reported at every stage and precision where clipping is on
    pp, zero = RUNS[name][2], RUNS[name][7]
    if zero or pp == 1:
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), name
    keys = {k for k in ref if not (tied and k == "lm_head.weight")}
    assert keys == set(trained), name
    for key in sorted(keys):
        moved, expected = trained[key] - start[key], ref[key] - start[key]
        scale = float(expected.abs().max())
        assert scale > 1e-3 * float(start[key].abs().max()), (name, key, scale)  # a step fp32 resolves
        torch.testing.assert_close(moved, expected, rtol=0, atol=2e-3 * scale, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("flags, error", [
    (("--idft-beta", 0), "--idft-beta must be > 0, got 0.0"),
    (("--idft-gamma-min", 2, "--idft-gamma-max", 1), "--idft-gamma-min 2.0 exceeds --idft-gamma-max 1.0"),
    (("--loss-chunk-size", 0), "--loss-chunk-size must be >= 1, got 0"),
    (("--no-fused-loss", "--loss-chunk-size", 64), "--loss-chunk-size sets the fused loss, which --no-fused-loss "
                                                   "turns off"),
    (("--fused-loss-kernel", "eager", "--no-fused-loss"), "--fused-loss-kernel sets the fused loss, which "
                                                          "--no-fused-loss turns off"),
])
def test_bad_loss_flags_are_one_line_errors(flags, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--train-data", "x.jsonl", "--train-iters", "1", "--deepspeed_config", "x.json",
                    *map(str, flags)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pretrain_idft: error: {error}"


def test_fused_and_unfused_runs_train_alike(steps):
    """Runs of the same objective and model, one fused and one not (in different layouts): the
    same reported losses and the same updated weights."""
    pairs = [("idft-pp2-fused-untied-zero0", "idft-tp2-unfused-untied"), ("eaft-tp2-fused", "eaft-dp2-gas2-unfused"),
             ("dft-dp2-fused-zero0", "dft-gas2-unfused"), ("idft-tp2-fused-untied", "idft-tp2-unfused-untied")]
    for fused, unfused in pairs:
        (a, ma, *_), (b, mb, *_) = steps(fused), steps(unfused)
        for key in ("loss", "loss_ce", "loss_dft", "loss_idft", "loss_eaft", "phi_mean", "loss_tokens"):
            assert ma[key] == pytest.approx(mb[key], rel=1e-5), (fused, key)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4 * float(b[key].abs().max()))

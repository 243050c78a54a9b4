"""Activation recomputation (--recompute-granularity full | selective, --recompute-activations):
it changes what is kept for the backward, never what is trained.

- launched as users launch it, two optimizer steps with lr > 0 at (T, P, DP) = (2,1,1) and
  (1,2,1), each with and without recomputation: the same per-iteration losses and the same updated
  weights, bit for bit (the recomputation runs the same kernels on the same inputs); T = P = 1 is
  the in-process test below;
- in one process, on the real pipeline layers: each recomputed block's forward runs twice per
  micro-batch (a forward hook on the real modules counts the calls), autograd keeps fewer bytes
  for the backward, and the gradients are the same bits.
"""
from collections import Counter
from types import SimpleNamespace

import deepspeed
import pytest
import torch
from safetensors.torch import load_file

from megatron_onpolicy.model.hf_io import load_hf_weights
from megatron_onpolicy.model.loader import load_arch
from megatron_onpolicy.parallel import state
from megatron_onpolicy.parallel.random import seed_model_parallel
from megatron_onpolicy.train.args import parse_args
from megatron_onpolicy.train.model import DecoderLayerPipe, build_pipeline, hf_names
from megatron_onpolicy.train.recompute import Recompute
from tests.dist_utils import run_distributed
from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

# name: (processes, T, P, micro-batch, recomputation flags); global batch 4, DP = 1
RUNS = {
    "tp2": (2, 2, 1, 4, ()),
    "tp2-selective": (2, 2, 1, 4, ("--recompute-activations",)),
    "pp2": (2, 1, 2, 2, ()),
    "pp2-full-uniform2": (2, 1, 2, 2, ("--recompute-granularity", "full", "--recompute-num-layers", 2)),
}
PAIRS = {(2, 1, 1): ("tp2", "tp2-selective"), (1, 2, 1): ("pp2", "pp2-full-uniform2")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recompute")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:8]))
    return SimpleNamespace(tmp=tmp, train=tmp / "train.jsonl", model=make_tiny_model(tmp / "tiny"))


@pytest.fixture(scope="module")
def trained(setup):
    out = {}
    for name, (n, tp, pp, micro, flags) in RUNS.items():
        folder = setup.tmp / name
        result = launch(n, "--model", setup.model, "--train-data", setup.train, "--seq-length", 128,
                        "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                        "--micro-batch-size", micro, "--global-batch-size", 4, "--train-iters", 2,
                        "--loss", "idft", "--lr", 1e-2, "--save", folder, "--export-hf", folder / "hf",
                        "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json", *flags, runner="torchrun")
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        weights = {k: v for f in sorted((folder / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
        out[name] = weights, read_metrics(folder)
    return out


@pytest.mark.parametrize("layout", list(PAIRS))
def test_recomputation_trains_the_same_bits(trained, layout):
    (ref_w, ref_m), (w, m) = (trained[name] for name in PAIRS[layout])
    assert [r["loss"] for r in m] == [r["loss"] for r in ref_m]
    assert m[1]["loss"] != ref_m[0]["loss"], "the step must move the loss"
    assert set(w) == set(ref_w)
    for key, value in ref_w.items():
        assert torch.equal(w[key], value), key


def test_flags():
    base = ["--train-data", "x.jsonl", "--deepspeed_config", "ds.json", "--train-iters", "1"]
    assert Recompute.from_args(parse_args(base)).granularity is None
    assert Recompute.from_args(parse_args(base + ["--recompute-activations"])).granularity == "selective"
    plan = Recompute.from_args(parse_args(base + ["--recompute-granularity", "full", "--recompute-method", "block"]))
    assert (plan.granularity, plan.method, plan.num_layers) == ("full", "block", 1)
    for bad in (["--recompute-activations", "--recompute-granularity", "full"], ["--recompute-num-layers", "2"],
                ["--recompute-granularity", "full", "--recompute-num-layers", "0"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    # stage 0 of P = 2 (embedding, 3 layers), the last stage (3 layers, norm, head), P = 1
    assert Recompute("full", "uniform", 2).groups([1, 2, 3], 4) == [(0, 1, False), (1, 3, True), (3, 4, True)]
    assert Recompute("full", "block", 2).groups([0, 1, 2], 5) == [(0, 1, True), (1, 2, True), (2, 3, False),
                                                                  (3, 5, False)]
    assert Recompute("full", "block", 9).groups([1, 2], 5) == [(0, 1, False), (1, 2, True), (2, 3, True),
                                                               (3, 5, False)]
    assert Recompute("selective").groups([1, 2], 5) == []


def _one_micro_batch(rank, world, folder):
    """Forward + backward of the real pipeline module on one process, without recomputation,
    selective and full: {granularity: (forward calls of each layer / attention / MLP, bytes
    autograd saved for the backward outside the parameters, grads)}."""
    deepspeed.init_distributed("gloo", verbose=False)
    state.initialize_model_parallel(1, 1)
    seed_model_parallel(0)
    _, arch = load_arch(str(folder))
    return {g: _step(folder, arch, g) for g in (None, "selective", "full")}


def _step(folder, arch, granularity):
    pipe = build_pipeline(arch, state.get_tensor_model_parallel_group(), state.topology(), None,
                          recompute=Recompute(granularity))
    load_hf_weights(pipe, folder, hf_names(pipe))
    calls = Counter()
    for layer in (f for f in pipe.forward_funcs if isinstance(f, DecoderLayerPipe)):
        for what, module in (("layer", layer), ("attn", layer.attn), ("mlp", layer.mlp)):
            module.register_forward_hook(lambda *_, key=(what, layer.index): calls.update([key]))

    params = {p.untyped_storage().data_ptr() for p in pipe.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, arch.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(96).expand(2, 96)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = pipe((ids, positions))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return dict(calls), sum(saved.values()), {n: p.grad for n, p in pipe.named_parameters()}


@pytest.fixture(scope="module")
def micro_batches(setup):
    return run_distributed(_one_micro_batch, 1, setup.model)


def test_recomputed_blocks_run_twice_and_keep_less(micro_batches):
    layers = range(4)
    calls, kept, grads = micro_batches[None]
    assert calls == {(what, i): 1 for what in ("layer", "attn", "mlp") for i in layers}
    calls, kept_selective, grads_selective = micro_batches["selective"]
    assert calls == {**{("layer", i): 1 for i in layers}, **{("attn", i): 2 for i in layers},
                     **{("mlp", i): 1 for i in layers}}
    calls, kept_full, grads_full = micro_batches["full"]
    print("bytes saved for the backward: none", kept, "selective", kept_selective, "full", kept_full)
    assert calls == {(what, i): 2 for what in ("layer", "attn", "mlp") for i in layers}
    assert kept_full < kept_selective < kept
    for name, g in grads.items():
        assert torch.equal(grads_selective[name], g) and torch.equal(grads_full[name], g), name

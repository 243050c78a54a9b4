"""The GPU path against the CPU and the dense references, where a CUDA device is (skipped
elsewhere, so CI, which has none, skips it; run it with `pytest tests/test_gpu.py` on a GPU
machine): the fused loss on realistic shapes in fp32 and bf16, the packed model against
transformers, KV-cached and hinted generation, and training steps launched as users launch them
(torchrun, NCCL) whose updated weights must equal the dense single-process step's."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_onpolicy.ddt import fused
from megatron_onpolicy.generate import HintConfig, SamplingParams, generate, hinted_generate
from megatron_onpolicy.generate.engine import DecodeState, HostCopy
from megatron_onpolicy.generate.sampling import sample
from megatron_onpolicy.model import attention
from megatron_onpolicy.model.attention import attend, packed_spans
from megatron_onpolicy.model.loader import load_model
from tests.test_attention import CUTS, SEG, mask_path
from tests.test_fused_loss import run_path
from tests.test_generate import IdTokenizer, prompts_of, save_tiny
from tests.test_model import VOCAB, make_hf_model
from tests.test_train_step import ROWS, dense_step, setup, step_flags  # noqa: F401 (setup: a fixture)
from tests.train_utils import ROOT, launch, read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU = torch.device("cuda")


def fused_case(n, vocab, dim, seed=0):
    """h [n, dim] and W [vocab, dim] at the scale of a real head (logits of a few units)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 3 / dim ** 0.5
    mask = (torch.rand(n, generator=g) < 0.8).float()
    targets = torch.randint(0, vocab, (n,), generator=g).masked_fill(mask == 0, -100)
    return hidden, weight, targets, mask


@pytest.fixture(params=fused.KERNELS)
def kernel(request):
    fused.set_kernels(request.param)
    yield request.param
    fused.set_kernels("compiled")


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("kind", ["ce", "idft"])
def test_fused_loss_on_gpu_equals_unfused_on_cpu(kind, kernel, passes):
    """fp32 on the GPU, several chunks (the last ragged), against the unfused path on the CPU, with
    the Triton kernels and with eager ops, in one pass (TP = 1) and in the two a TP rank runs (the
    backward's logit gradient in its own kernel). The gradients are sums over the 49152
    logits of a row taken in another order (GPU reductions): 2e-5 of the largest entry, about
    sqrt(V) fp32 roundings (an H100 gave 1.14e-5 on one entry, eager)."""
    hidden, weight, targets, mask = fused_case(1000, 49152, 576)
    ref = run_path(False, hidden, weight, targets, mask, kind, 1.0, None, 49152)
    got = run_path(True, *(t.to(GPU) for t in (hidden, weight, targets, mask)), kind, 1.0, None, 49152, chunk=384,
                   two_pass=passes == 2)
    torch.testing.assert_close(got[0].cpu(), ref[0], rtol=1e-5, atol=0)
    for i, what in ((2, "hidden"), (3, "weight")):
        scale = float(ref[i].abs().max())
        torch.testing.assert_close(got[i].cpu(), ref[i], rtol=0, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")
    keep = mask.bool()
    for name in ("logp", "entropy", "phi", "var"):
        sel = keep if name in ("logp", "phi") else slice(None)
        torch.testing.assert_close(getattr(got[1], name)[sel].cpu(), getattr(ref[1], name)[sel], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("passes", [1, 2])
def test_fused_loss_bf16_on_gpu_is_within_bf16_rounding(kernel, passes):
    """bf16 h and W into the tensor cores with fp32 accumulation: the loss and both gradients one
    bf16 rounding (2^-8 relative, plus the sums' order) from fp32 arithmetic on the same bf16
    values, and no fp32 copy of W (545 MB here) on top of what the path must hold; in one pass
    and in two (a TP rank's, whose backward writes the bf16 logit gradient)."""
    n, vocab, dim, chunk = 1000, 151936, 896, 384
    hidden, weight, targets, mask = (t.to(GPU) for t in fused_case(n, vocab, dim, seed=1))
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    two_pass = passes == 2
    ref = run_path(True, hidden.float(), weight.float(), targets, mask, "idft", 1.0, None, vocab, chunk=chunk,
                   two_pass=two_pass)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = run_path(True, hidden, weight, targets, mask, "idft", 1.0, None, vocab, chunk=chunk, two_pass=two_pass)
    peak = torch.cuda.max_memory_allocated() - base
    # The chunk buffers (the one pass's fp32 ones; two: the statistics pass's, more than the
    # backward's fp32 logits and bf16 gradient); per element of h and W, run_path's bf16 clone,
    # the fp32 gradient and its bf16 copy.
    held = (3 if kernel == "eager" and not two_pass else 2) * chunk * vocab * 4 + (n + vocab) * dim * (2 + 4 + 2)
    assert peak < held + (64 << 20), (peak, held)
    assert got[2].dtype == got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for i in (2, 3):
        torch.testing.assert_close(got[i].float(), ref[i], rtol=2 ** -7, atol=2 ** -7 * float(ref[i].abs().max()))


@pytest.fixture(params=attention.BACKENDS)
def backend(request):
    attention.set_backend(request.param)
    yield request.param
    attention.set_backend("sdpa")


@pytest.mark.parametrize("kind", ["llama-tied", "mistral-window", "qwen3"])
def test_packed_model_on_gpu_equals_transformers(tmp_path, kind, backend):
    """Each packed document's logits on the GPU equal transformers' on that document alone (CPU);
    the parameter gradients of the spans (or flex_attention) equal those through boolean masks, on
    the GPU. flex runs where heads are 16 wide or more (qwen3 here), the spans elsewhere."""
    hf = make_hf_model(kind, tmp_path)
    model, _ = load_model(str(tmp_path), device=GPU)
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, SEG.shape)
    pos = torch.tensor([[i - s for s, e in zip(c, c[1:]) for i in range(s, e)] for c in CUTS])
    ids, pos, seg = ids.to(GPU), pos.to(GPU), SEG.to(GPU)
    masks_made = attention.block_mask.cache_info().misses
    logits = model(ids, pos, segment_ids=seg)
    flex = backend == "flex" and model.cfg.head_dim >= attention.FLEX_MIN_HEAD_DIM
    assert attention.block_mask.cache_info().misses == masks_made + flex
    for b, cuts in enumerate(CUTS):
        for s, e in zip(cuts, cuts[1:]):
            with torch.no_grad():
                theirs = hf(ids[b:b + 1, s:e].cpu()).logits[0]
            torch.testing.assert_close(logits[b, s:e, :VOCAB].cpu(), theirs, rtol=0, atol=1e-4)
    weight = torch.randn_like(logits)
    grads = []
    for masks in (None, [mask_path(SEG, w).to(GPU) for w in model.cfg.windows]):
        model.zero_grad()
        (model(ids, pos, segment_ids=seg, masks=masks) * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("how", ["whole", "packed", "packed-window"])
def test_fp32_gqa_attention_on_gpu_builds_no_l_by_l_scores(how, backend):
    """fp32 GQA attention over one 4k row (whole, or 8 packed samples, with or without a window of
    300), forward and backward: the peak stays below a quarter of one [H, L, L] fp32 score tensor,
    which SDPA's math kernel (where `enable_gqa` alone leads in fp32) builds; outputs and gradients
    equal the CPU's. Packed rows go to flex_attention with the flex backend."""
    H, Hk, L, D = 9, 3, 4096, 64
    g = torch.Generator().manual_seed(0)
    cpu = [torch.randn(1, h, L, D, generator=g).requires_grad_() for h in (H, Hk, Hk)]
    gpu = [t.detach().to(GPU).requires_grad_() for t in cpu]
    seg = torch.repeat_interleave(torch.arange(8), 512)[None]
    window = 300 if how == "packed-window" else None
    spans = {dev: None if how == "whole" else packed_spans(seg.to(dev)).with_window(window) for dev in ("cpu", GPU)}
    weight = torch.randn(1, H, L, D, generator=g)
    ref = attend(*cpu, spans["cpu"], gqa=True)
    (ref * weight).sum().backward()
    weight = weight.to(GPU)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    masks_made = attention.block_mask.cache_info().misses
    out = attend(*gpu, spans[GPU], gqa=True)
    (out * weight).sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < H * L * L * 4 / 4, peak
    assert attention.block_mask.cache_info().misses == masks_made + (how != "whole" and backend == "flex")
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), rtol=1e-4, atol=1e-5)
    for name, a, b in zip("qkv", gpu, cpu):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_generation_on_gpu_equals_cpu(tmp_path):
    """Greedy batched generation (left padding, KV cache) and greedy hinted decoding give the CPU's
    tokens; sampled generation runs on the device's generator."""
    save_tiny("llama-tied", tmp_path, 0.3)
    models = {dev: load_model(str(tmp_path), device=dev)[0] for dev in ("cpu", GPU)}
    prompts, hints = prompts_of([2, 40, 7]), prompts_of([30, 9, 17], seed=1)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, eos_ids=())
    tokens = {dev: [g.tokens for g in generate(m, prompts, greedy)] for dev, m in models.items()}
    assert tokens["cpu"] == tokens[GPU]
    hinted = {dev: [r.tokens for r in hinted_generate(m, IdTokenizer(), hints, prompts, greedy, HintConfig())]
              for dev, m in models.items()}
    assert hinted["cpu"] == hinted[GPU]
    sampled = generate(models[GPU], prompts, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12,
                                                            eos_ids=(), seed=3))
    assert [len(g.tokens) for g in sampled] == [12] * 3


@pytest.mark.parametrize("kind", ["llama-tied", "mistral-window"])
def test_decoding_in_a_cuda_graph_equals_eager(tmp_path, kind):
    """Decode steps replayed from one CUDA graph give the eager steps' logits and tokens: greedy
    and sampled generation and hinted decoding (sliding windows, GQA, left padding); a state's
    graph is captured once and replayed for every later step."""
    save_tiny(kind, tmp_path, 0.3)
    model = load_model(str(tmp_path), device=GPU)[0]
    prompts, hints = prompts_of([2, 40, 7]), prompts_of([30, 9, 17], seed=1)
    with torch.no_grad():
        eager, graphed = DecodeState(model, prompts, 8), DecodeState(model, prompts, 8, cuda_graph=True)
        logits = [(eager.prefill(), graphed.prefill())]
        tokens = logits[0][0].argmax(-1)
        for step in range(8):
            logits.append((eager.step(tokens), graphed.step(tokens)))
            tokens = logits[-1][0].argmax(-1)
            if step == 0:
                graph = graphed.graph
    assert graph is not None and graphed.graph is graph
    for k, (a, b) in enumerate(logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {k}: {m}")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, eos_ids=())
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12, eos_ids=(), seed=3)
    for params in (greedy, sampled):
        runs = [[g.tokens for g in generate(model, prompts, params, cuda_graph=c)] for c in (False, True)]
        assert runs[0] == runs[1]
        runs = [[r.tokens for r in hinted_generate(model, IdTokenizer(), hints, prompts, params, HintConfig(),
                                                    cuda_graph=c)] for c in (False, True)]
        assert runs[0] == runs[1]


def test_sampling_on_gpu_never_waits_for_the_device():
    """sample() on CUDA logits makes no host sync (torch raises at one in this mode): the host
    queues the next decode step while the device still computes this one."""
    logits = torch.randn(16, 49152, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for top_k, top_p in ((0, 1.0), (50, 1.0), (0, 0.95), (20, 0.9)):
            sample(logits, 0.7, top_p, top_k, torch.Generator(device="cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_host_copy_waits_for_its_copies_only():
    """A decode loop reads a step's tokens while the device runs the next forward (HostCopy): the
    copies arrive whole, and reading them does not wait for the work queued after them."""
    tokens, lam = torch.arange(5, device=GPU) * 7, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], device=GPU)
    host = HostCopy(tokens, lam)
    torch.cuda._sleep(2_000_000_000)  # a kernel that spins for about a second, queued after the copies
    later = torch.cuda.Event()
    later.record()
    assert host.lists() == [[0, 7, 14, 21, 28], [0.0, 0.25, 0.5, 0.75, 1.0]]
    assert not later.query(), "reading the copies waited for the work queued after them"
    torch.cuda.synchronize()


# name: (loss, fused, model (tests/test_train_step.py's), DeepSpeed config)
GPU_RUNS = {"idft-fused-zero0": ("idft", True, "tied", "zero0_fp32"),
            "ce-unfused-untied-zero1": ("ce", False, "untied", "zero1_fp32"),
            "idft-fused-bf16": ("idft", True, "tied", "zero1_bf16")}


@pytest.mark.parametrize("name", GPU_RUNS)
def test_training_step_on_gpu_equals_dense_reference(setup, name):  # noqa: F811
    """`torchrun --nproc_per_node 1 launch/pretrain_idft.py` (NCCL): fp32 runs move every weight as the
    dense single-process step does (tests/test_train_step.py); the bf16 run reports the dense
    loss to bf16 accuracy. Every record carries the iteration's peak GPU memory."""
    kind, fused, model, config = GPU_RUNS[name]
    ref, (ref_loss, _), lr = dense_step(setup.models[model], setup.train, kind)
    out = setup.tmp / f"gpu-{name}"
    result = launch(1, "--model", setup.models[model], "--train-data", setup.train, "--seq-length", 256,
                    "--micro-batch-size", 2, "--global-batch-size", ROWS, "--train-iters", 1,
                    "--loss", kind, *(() if fused else ("--no-fused-loss",)),
                    *step_flags(lr), "--clip-grad", 1e9,
                    "--save", out, "--export-hf", out / "hf",
                    "--deepspeed_config", ROOT / "ds_configs" / f"{config}.json", runner="torchrun")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    metrics = read_metrics(out)[0]
    assert metrics["mem_peak_gb"] > 0
    if config.endswith("bf16"):
        assert metrics["loss"] == pytest.approx(ref_loss, rel=2e-2)
        return
    assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
    trained = {k: v for f in sorted((out / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    start = load_file(setup.models[model] / "model.safetensors")
    for key in trained:
        moved, expected = trained[key] - start[key], ref[key] - start[key]
        scale = float(expected.abs().max())
        assert scale > 1e-3 * float(start[key].abs().max()), (name, key, scale)
        torch.testing.assert_close(moved, expected, rtol=0, atol=2e-3 * scale, msg=lambda m: f"{name} {key}: {m}")

"""The TP model against transformers' own models, and the HF export round trip."""
import copy
import json
import shutil

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file, save_file

from megatron_onpolicy.model.hf_io import gather_hf_tensors, write_hf_extras
from megatron_onpolicy.model.loader import load_model
from megatron_onpolicy.parallel.mappings import gather_from_tp
from tests.dist_utils import run_distributed

VOCAB = 101  # divisible by neither 2 nor 4: the padded rows must stay out of the logits


def tiny_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                  rms_norm_eps=1e-5)
    if kind == "llama-tied":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "llama3-rope":
        return transformers.LlamaConfig(**common, attention_bias=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "llama-yarn":  # attention factor 0.1 ln 4 + 1 != 1: scales both cos and sin
        return transformers.LlamaConfig(**common, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if kind == "mistral-window":
        return transformers.MistralConfig(**common, sliding_window=5)
    if kind == "llama-mlp-bias":  # gate and up biases: one fused gate_up bias, split over TP
        return transformers.LlamaConfig(**common, mlp_bias=True, attention_bias=True)
    if kind == "qwen3-bias":
        return transformers.Qwen3Config(**common, head_dim=16, attention_bias=True)
    if kind == "qwen2-window":  # layer_types: layer 0 full, layer 1 a window of 5 (the inputs are longer)
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    raise ValueError(kind)


def make_hf_model(kind, folder):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager")
    with torch.no_grad():  # random, non-trivial norm weights and biases
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    return model.eval()


def sharded_logits(model, ids):
    with torch.no_grad():
        logits = gather_from_tp(model(ids), model.tp_group)
    return logits[..., :model.cfg.vocab_size]


def _tp_logits_worker(rank, world, folders, ids):
    group = dist.group.WORLD
    out = {}
    for kind, folder in folders.items():
        model, _ = load_model(str(folder), group)
        out[kind] = sharded_logits(model, ids)
    return out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    kinds = ["llama-tied", "llama3-rope", "llama-yarn", "qwen2", "qwen3", "mistral-window", "llama-mlp-bias",
             "qwen3-bias", "qwen2-window"]
    root = tmp_path_factory.mktemp("hf")
    return {k: (root / k, make_hf_model(k, root / k)) for k in kinds}


def test_tp_logits_match_transformers(hf_models):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 20))  # positions past the RoPE types' original 16
    folders = {k: f for k, (f, _) in hf_models.items()}
    ref = {}
    for kind, (_, hf) in hf_models.items():
        with torch.no_grad():
            ref[kind] = hf(ids).logits
    # qwen2-window's second layer slides in transformers: without it the logits differ (not a vacuous case)
    hf = hf_models["qwen2-window"][1]
    assert hf.config.layer_types == ["full_attention", "sliding_attention"], hf.config.layer_types
    config = copy.deepcopy(hf.config)
    config.layer_types = ["full_attention"] * 2
    full = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    full.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (full(ids).logits - ref["qwen2-window"]).abs().max() > 1e-2
    for tp in (1, 2, 4):
        got = _tp_logits_worker(0, 1, folders, ids) if tp == 1 else run_distributed(
            _tp_logits_worker, tp, folders, ids)
        for kind in folders:
            torch.testing.assert_close(got[kind], ref[kind], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{kind} TP={tp}: {m}")


def _export_worker(rank, world, folder, out, ids):
    model, _ = load_model(str(folder), dist.group.WORLD)
    state = {k: v for merged in gather_hf_tensors(model) for k, v in merged.items()}  # every TP rank takes part
    if rank == 0:
        out.mkdir()
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        write_hf_extras(out, model.cfg, None, torch.float32)
    dist.barrier()
    return sharded_logits(model, ids)


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2", "llama-mlp-bias"])
def test_export_round_trip(hf_models, tmp_path, kind):
    """The source's config.json says bfloat16 over fp32 weights (as a checkpoint saved in fp32 from
    a bf16 config can): the export of the fp32 model must say float32, or transformers, which loads
    in the config's dtype, would round the exported weights to bf16."""
    source, folder = hf_models[kind][0], tmp_path / "source"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    ids = torch.randint(0, VOCAB, (2, 9))
    ours = run_distributed(_export_worker, 2, folder, tmp_path / "export", ids)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "float32"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours, rtol=1e-4, atol=1e-5)
    exported = back.state_dict()
    for name, tensor in load_file(source / "model.safetensors").items():  # the fp32 weights as written
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor), name


def test_checkpoints_that_disagree_with_their_config_are_errors(hf_models, tmp_path):
    """A tensor no part of the model takes (a checkpoint of another architecture, say) stops the
    load on a pipeline stage too, not only where one rank holds the whole model; so does a tensor
    larger than config.json says (a slice of it would fit the shard). A tied model's own
    lm_head.weight is ignored where it is a copy of the embedding, as transformers ignores it, and
    an error where it differs (transformers then unties the model)."""
    from megatron_onpolicy.model.hf_io import load_hf_weights
    from megatron_onpolicy.model.loader import load_arch
    from megatron_onpolicy.model.llama import TransformerLM

    source, reference = hf_models["llama-tied"]
    weights = load_file(source / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    ids = torch.randint(0, VOCAB, (1, 7))
    cases = {  # name: (tensors replaced or added, the error, or None)
        "extra": ({"model.layers.0.mlp.extra.weight": torch.randn(VOCAB, 64)},
                  r"checkpoint tensors the architecture does not use: \['model.layers.0.mlp.extra.weight'\]"),
        "wide": ({"model.layers.0.mlp.up_proj.weight": torch.randn(128, 64)},
                 r"tensor 'model.layers.0.mlp.up_proj.weight' has shape \(128, 64\), config.json gives \(96, 64\)"),
        "head-copy": ({"lm_head.weight": embed.clone()}, None),
        "head-other": ({"lm_head.weight": embed + 1e-3}, "lm_head.weight differs from model.embed_tokens.weight"),
    }
    for name, (tensors, error) in cases.items():
        folder = tmp_path / name
        shutil.copytree(source, folder)
        save_file({**weights, **tensors}, folder / "model.safetensors")
        stage = TransformerLM(load_arch(str(folder))[1], None)
        if error:
            stage.layers = stage.layers[:1]  # a first stage's share of the layers
            with pytest.raises(ValueError, match=error):
                load_hf_weights(stage, folder)
        else:
            load_hf_weights(stage, folder)
            with torch.no_grad():
                torch.testing.assert_close(stage(ids), reference(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, key, value", [
    ("llama", "sliding_window", 4),      # transformers' Llama has no window
    ("mistral", "attention_bias", True),  # Mistral's and Qwen3's MLPs, Mistral's attention: no bias
    ("qwen3", "mlp_bias", True),
])
def test_config_keys_a_family_does_not_read_change_nothing(tmp_path, kind, key, value):
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen3": transformers.Qwen3Config}[kind](
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **({"sliding_window": None} if kind == "mistral" else {}))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model, _ = load_model(str(tmp_path))
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(sharded_logits(model, ids), reference(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, error", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
     "rope_type 'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}},
     "rope_type 'longrope' is not supported"),
])
def test_configs_it_would_compute_differently_are_refused(change, error):
    """transformers computes these differently from the model here (another activation; RoPE
    frequencies recomputed once the input outgrows a length): refused, not run wrongly."""
    from megatron_onpolicy.model.config import ArchConfig, ModelConfigError

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, **change)
    with pytest.raises(ModelConfigError, match=error):
        ArchConfig.from_hf(config)


def test_a_model_folder_transformers_cannot_read_is_named(hf_models, tmp_path):
    """A config.json that is no JSON, or a folder without tokenizer files: one ModelPathError that
    names the folder (both were tracebacks from transformers)."""
    from megatron_onpolicy.model.hub import ModelPathError
    from megatron_onpolicy.model.loader import load_arch, load_tokenizer

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ModelPathError, match=rf"^{broken}/config.json: transformers cannot read it \(.+\)$"):
        load_arch(str(broken))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(hf_models["llama-tied"][0], untokenized)
    for f in untokenized.glob("*token*"):
        f.unlink()
    load_arch(str(untokenized))  # the model itself is fine
    with pytest.raises(ModelPathError, match=rf"^model folder '{untokenized}': transformers cannot load its tokenizer"):
        load_tokenizer(untokenized)


def test_cache_dir_ignores_an_empty_setting(monkeypatch, tmp_path):
    from megatron_onpolicy.model.hub import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEGATRON_ONPOLICY_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "megatron_onpolicy"
    monkeypatch.setenv("MEGATRON_ONPOLICY_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_a_conversion_finished_elsewhere_first_is_kept(tmp_path):
    """Two nodes converting the same GGUF file (a lock that does not span nodes): the second one's
    folder is dropped for the first's, not a crash on renaming onto it (ENOTEMPTY)."""
    from megatron_onpolicy.model.hub import _publish

    first, second, out = tmp_path / "a", tmp_path / "b", tmp_path / "model"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    _publish(first, out)
    _publish(second, out)
    assert (out / "config.json").read_text() == "first" and not first.exists() and not second.exists()
    (out / "config.json").rename(out / "notes.txt")  # a folder there that is no conversion: not taken for one
    second.mkdir()
    (second / "config.json").write_text("second")
    with pytest.raises(OSError):
        _publish(second, out)


def _gather_grad_worker(rank, world):
    """TP groups {0, 1} and {2, 3}: a rank's place in its group is not its global rank."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    group, first = groups[rank // 2], rank // 2 * 2
    shard = lambda r: torch.arange(6.0).reshape(2, 3) + 10 * r  # [2, 3] shards, distinct per rank
    x = shard(rank).requires_grad_()
    y = gather_from_tp(x, group)
    torch.testing.assert_close(y.detach(), torch.cat([shard(first), shard(first + 1)], -1), rtol=0, atol=0)
    upstream = torch.arange(12.0).reshape(2, 6) * (rank + 1)  # distinct in every column and on every rank
    y.backward(upstream)
    local = rank - first
    return rank, x.grad, upstream[:, 3 * local:3 * local + 3]


def _gather_grad_all(rank, world):
    out = [None] * world
    dist.all_gather_object(out, _gather_grad_worker(rank, world))
    return out


def test_gather_from_tp_backward_keeps_the_group_ranks_slice():
    """gather_from_tp's backward hands each rank the upstream gradient's columns of its own shard,
    by its rank in the TP group (ranks 2 and 3 are the first and second of theirs)."""
    results = run_distributed(_gather_grad_all, 4)
    assert [r for r, _, _ in results] == [0, 1, 2, 3]
    for rank, grad, expected in results:
        torch.testing.assert_close(grad, expected, rtol=0, atol=0, msg=lambda m: f"rank {rank}: {m}")


def _embedding_worker(rank, world):
    """Every id of the vocabulary, so every shard's first and last row (the ids next to a boundary),
    through VocabParallelEmbedding at TP 4 over the world and TP 2 in groups {0, 1} and {2, 3}."""
    import torch.nn.functional as F

    from megatron_onpolicy.parallel.layers import VocabParallelEmbedding

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank makes every group
    for tp, group in ((4, dist.group.WORLD), (2, pairs[rank // 2])):
        g = torch.Generator().manual_seed(tp)  # the same full matrix and upstream gradient on every rank
        full = torch.randn(VOCAB, 8, generator=g, dtype=torch.float64)
        ids = torch.cat([torch.arange(VOCAB), torch.randint(0, VOCAB, (40,), generator=g)]).view(3, -1)
        upstream = torch.randn(*ids.shape, 8, generator=g, dtype=torch.float64)
        emb = VocabParallelEmbedding(VOCAB, 8, group, dtype=torch.float64)
        start = dist.get_rank(group) * emb.shard
        # this rank's rows of a [VOCAB, 8] matrix, the padded rows past VOCAB zero
        own_rows = lambda t: F.pad(t, (0, 0, 0, emb.shard * tp - VOCAB))[start:start + emb.shard]
        with torch.no_grad():
            emb.weight.copy_(own_rows(full))
        out = emb(ids)
        out.backward(upstream)
        dense = full.clone().requires_grad_()
        F.embedding(ids, dense).backward(upstream)  # the dense weight gradient, repeated ids summed
        what = f"TP={tp} rank {dist.get_rank(group)}"
        torch.testing.assert_close(out, F.embedding(ids, full), rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(emb.weight.grad, own_rows(dense.grad), rtol=0, atol=1e-12,
                                   msg=lambda m: f"{what} grad: {m}")


def test_vocab_parallel_embedding_at_every_shard_boundary():
    """VOCAB 101 pads to 51 rows a rank at TP 2 and 26 at TP 4: the output against F.embedding on
    the full matrix, each rank's weight gradient against dense autograd's rows of its shard."""
    run_distributed(_embedding_worker, 4)


def _rng_worker(rank, world):
    """TP 2 x DP 2: the draws of the default generator and of the tracker's model-parallel stream."""
    import deepspeed

    from megatron_onpolicy.parallel import state
    from megatron_onpolicy.parallel.random import seed_model_parallel

    deepspeed.init_distributed("gloo", verbose=False)  # over the gloo group run_distributed made
    state.initialize_model_parallel(tp=2)
    seed_model_parallel(1234)
    default = torch.rand(6)
    with deepspeed.checkpointing.get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(6)
    after = torch.rand(6)  # the fork leaves the default stream where it was
    out = [None] * world
    dist.all_gather_object(out, (state.get_tensor_model_parallel_rank(), state.get_data_parallel_rank(),
                                 default, tp_stream, after))
    return out


def test_model_parallel_rng_streams():
    """Megatron's semantics (parallel/random.py): the default generator draws alike on every rank,
    the tracker's stream alike across DP and differently across TP ranks; written out here as
    Megatron seeds them (seed, and seed + 2718 + TP rank)."""
    results = run_distributed(_rng_worker, 4)
    assert sorted((tp, dp) for tp, dp, *_ in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    g = torch.Generator().manual_seed(1234)
    default, after = torch.rand(6, generator=g), torch.rand(6, generator=g)
    tracker = {tp: draws[1] for tp, dp, *draws in results}
    assert not torch.equal(tracker[0], tracker[1])  # the TP ranks draw different dropout masks
    for tp, dp, *draws in results:
        expected = (default, torch.rand(6, generator=torch.Generator().manual_seed(1234 + 2718 + tp)), after)
        for name, got, want in zip(("default", "tracker", "after the fork"), draws, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"TP {tp} DP {dp} {name}: {m}")

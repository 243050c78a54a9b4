"""Indexed datasets end to end: tools/preprocess_data.py (any worker count gives the same bytes;
the decoded samples are tokenize_row's), training on a PREFIX equals training on the raw file and
both equal a dense transformers computation, blends draw in proportion and resume exactly, damaged
or foreign files fail with one line naming the file."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from megatron_onpolicy.data import DataError, collate, fit_length, read_rows, tokenize_row
from megatron_onpolicy.data.indexed import IndexedDataset
from megatron_onpolicy.data.preprocess import Settings, _claim_tmp, preprocess
from megatron_onpolicy.model.loader import load_tokenizer
from megatron_onpolicy.train.batches import Part, TrainBatches, ValidBatches, load_parts
from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

L = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("indexed")
    old = os.environ.get("MEGATRON_ONPOLICY_DATA_CACHE")
    os.environ["MEGATRON_ONPOLICY_DATA_CACHE"] = str(tmp / "cache")  # the launched runs inherit it
    rows = [json.loads(line) for line in (ROOT / "data" / "math_sft.jsonl").read_text().splitlines()]
    # 28 prompt/response rows and 4 two-turn conversations; a blank line (not a row) in between
    convs = [{"messages": [{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["response"]},
                           {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["response"]}]}
             for a, b in zip(rows[40:48:2], rows[41:48:2])]
    lines = [json.dumps(r) for r in rows[:14]] + [""] + [json.dumps(r) for r in rows[14:28] + convs]
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[60:76]))
    (tmp / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[80:96]))
    model = make_tiny_model(tmp / "tiny")
    s = SimpleNamespace(tmp=tmp, model=model, train=tmp / "train.jsonl", tok=load_tokenizer(model))
    packed = Settings(seq_length=L, pack=True)
    preprocess(s.train, tmp / "packed1", model, packed, workers=1, progress=False)
    preprocess(s.train, tmp / "plain", model, Settings(), workers=1, progress=False)
    preprocess(tmp / "a.jsonl", tmp / "a", model, Settings(), workers=1, progress=False)
    result = launch(0, "--input", s.train, "--output-prefix", tmp / "packed2", "--model", model, "--workers", 2,
                    "--seq-length", L, "--pack", script="tools/preprocess_data.py")
    assert result.returncode == 0, result.stderr[-3000:]
    yield s
    if old is None:
        del os.environ["MEGATRON_ONPOLICY_DATA_CACHE"]
    else:
        os.environ["MEGATRON_ONPOLICY_DATA_CACHE"] = old


def test_workers_give_the_same_bytes_and_samples_are_tokenize_rows(setup):
    s = setup
    for ext in ("bin", "idx", "json"):
        assert (s.tmp / f"packed1.{ext}").read_bytes() == (s.tmp / f"packed2.{ext}").read_bytes(), ext
    rows = read_rows(s.train)
    truth = [tokenize_row(s.tok, r.data, r.source, i) for i, r in enumerate(rows)]
    assert len(truth) == 32 and sum("messages" in r.data for r in rows) == 4
    for prefix in ("plain", "packed2"):
        ds = IndexedDataset(s.tmp / prefix)
        assert ds.dtype == np.uint16 and ds.meta["source"]["rows"] == 32
        assert [ds.sample(i) for i in range(len(ds))] == truth, prefix
    ds = IndexedDataset(s.tmp / "packed2")
    packs = [ds.pack(p) for p in range(ds.packs)]
    assert sorted(i for p in packs for i in p.indices) == list(range(32))  # every sample in one pack
    assert all(len(p.input_ids) <= L for p in packs) and len(packs) < 32 // 2
    for p in packs:
        assert p.input_ids == [t for i in p.indices for t in truth[i].input_ids]
        assert p.segment_ids == [k for k, i in enumerate(p.indices, 1) for _ in truth[i].input_ids]


def test_samples_cut_at_read_time_are_fit_lengths_of_the_rows(setup):
    """A prefix preprocessed without --seq-length is fitted when read: sample(i, k) and a Part of
    --seq-length k give data.fit_length(tokenize_row(row), k, "truncate") of the raw rows, ids,
    loss mask and prompt length alike (the mask read after the sample's n ids, not after k)."""
    s = setup
    ds = IndexedDataset(s.tmp / "plain")
    assert not ds.meta["seq_length"]
    truth = [tokenize_row(s.tok, r.data, r.source, i) for i, r in enumerate(read_rows(s.train))]
    conv_lengths = [len(t.input_ids) for t in truth[28:]]
    for k in (58, 70, 100, min(conv_lengths) - 5):
        fitted = [fit_length(t, k, "truncate") for t in truth]
        cut = [i for i, (t, f) in enumerate(zip(truth, fitted)) if f is not None and len(t.input_ids) > k]
        assert len(cut) >= 4, k  # samples that really are cut, with targets left
        for i in cut:
            assert ds.sample(i, k) == fitted[i], (k, i)
            assert ds.sample(i, k).loss_mask == truth[i].loss_mask[:k]
        args = SimpleNamespace(seq_length=k, overlong="truncate")
        part = Part("plain", ds, args, False)
        kept = [f for f in fitted if f is not None]
        assert part.items == len(kept) and part.truncated == len(cut), k
        assert [part.item(j) for j in range(part.items)] == kept, k
    assert any(fit_length(t, 58, "truncate") is None for t in truth)  # k 58 drops some rows too
    # The edge, read off the masks: at k = row 0's prompt length its k tokens hold no target (dropped);
    # at k + 1 the last of them is its one target (kept).
    p = truth[0].prompt_len
    for k in (p, p + 1):
        part = Part("plain", ds, SimpleNamespace(seq_length=k, overlong="truncate"), False)
        items = [part.item(j) for j in range(part.items)]
        assert [t.index for t in items] == [i for i, t in enumerate(truth) if 1 in t.loss_mask[:k]], k
        assert (items[0].index == 0) == (k == p + 1), k
    assert items[0].loss_mask == [0] * p + [1] and items[0].input_ids == truth[0].input_ids[:p + 1]


def test_preprocess_tool_drops_overlong_rows(setup, tmp_path, capsys):
    """tools/preprocess_data.py --overlong drop (in process): the rows longer than --seq-length are
    left out whole, counted from the rows' own tokenize_row lengths; the others are kept as they are."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("preprocess_tool", ROOT / "tools" / "preprocess_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    s, k = setup, 100
    tool.main(tool.parse_args(["--input", str(s.train), "--output-prefix", str(tmp_path / "d"), "--model", str(s.model),
                               "--seq-length", str(k), "--overlong", "drop"]))
    truth = [tokenize_row(s.tok, r.data, r.source, i) for i, r in enumerate(read_rows(s.train))]
    long = [i for i, t in enumerate(truth) if len(t.input_ids) > k]
    assert 0 < len(long) < len(truth)
    meta = json.loads((tmp_path / "d.json").read_text())
    assert (meta["overlong"], meta["seq_length"], meta["dropped"], meta["truncated"]) == ("drop", k, len(long), 0)
    ds = IndexedDataset(tmp_path / "d")
    assert [ds.sample(j) for j in range(len(ds))] == [t for i, t in enumerate(truth) if i not in long]
    assert f"32 rows -> {32 - len(long)} samples (0 truncated, {len(long)} dropped)" in capsys.readouterr().out


def test_raw_file_cache_is_keyed_by_the_chat_template(setup, tmp_path, monkeypatch):
    """The same vocabulary under another chat template tokenizes a raw file differently: it gets
    a cache of its own, whose samples are tokenize_row's under that template."""
    import torch.distributed as dist

    from megatron_onpolicy.train.batches import cached
    from tests.dist_utils import one_process_group
    s = setup
    monkeypatch.setenv("MEGATRON_ONPOLICY_DATA_CACHE", str(tmp_path / "cache"))
    other = load_tokenizer(s.model)
    other.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    other.save_pretrained(tmp_path / "other")
    other = load_tokenizer(tmp_path / "other")  # as the run would load it
    args = SimpleNamespace(prompt_key="prompt", response_key="response", seq_length=L, overlong="truncate", pack=False)
    assert not dist.is_initialized()
    with one_process_group():  # cached() agrees on errors across ranks: a world of one
        first = cached(s.train, s.tok, s.model, args)
        second = cached(s.train, other, tmp_path / "other", args)
    assert first != second and len(list((tmp_path / "cache").glob("*.idx"))) == 2
    rows = read_rows(s.train)
    for prefix, tok in ((first, s.tok), (second, other)):
        ds = IndexedDataset(prefix)
        assert [ds.sample(i) for i in range(len(ds))] == [tokenize_row(tok, r.data, r.source, i)
                                                          for i, r in enumerate(rows)]
    assert IndexedDataset(first).sample(0) != IndexedDataset(second).sample(0)  # the templates really differ


def _cache_built_by_one(rank, world, local_ranks, store, cache, model, train, seconds, late=0):
    """cached() on this rank, as node-local rank local_ranks[rank], under a collective timeout of
    2 s (where `late` is 0), a build on this rank made to last `seconds` more, its sidecar shown
    only `late` seconds after it returned; then the dataset opened, as load_parts does. -> every
    rank's (builds, prefix, samples)."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_onpolicy.train import batches

    if not late:
        # The same world again, with a short timeout. The barrier first: rank 0 left
        # init_process_group as soon as its side of the mesh was up, and closing it then failed
        # rank 1's connectFullMesh ("Connection closed by peer"; once in a clean-clone CI run).
        dist.barrier()
        dist.destroy_process_group()
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=timedelta(seconds=2))
    os.environ.update(LOCAL_RANK=str(local_ranks[rank]), MEGATRON_ONPOLICY_DATA_CACHE=cache)
    builds, preprocess = [], batches.preprocess

    def slow(src, prefix, *a, **k):
        builds.append(rank)
        time.sleep(seconds)
        meta = preprocess(src, prefix, *a, **k)
        if late:  # as another node would see it, where NFS still has the name cached as missing
            sidecar = Path(f"{prefix}.json")
            os.replace(sidecar, f"{sidecar}.hidden")
            threading.Timer(late, os.replace, (f"{sidecar}.hidden", sidecar)).start()
        return meta

    batches.preprocess = slow
    args = SimpleNamespace(prompt_key="prompt", response_key="response", seq_length=L, overlong="truncate", pack=False)
    prefix = batches.cached(train, load_tokenizer(model), model, args)
    found = [None] * world
    dist.all_gather_object(found, (len(builds), prefix, len(IndexedDataset(prefix))))
    return found


def test_a_raw_file_is_built_once_while_the_others_wait_past_the_collective_timeout(setup, tmp_path):
    """The ranks that do not build wait for the build on a file lock: a build longer than the
    collective timeout (here 2 s; --distributed-timeout-minutes) stopped them before. Two nodes
    on a file system whose locks span them (both ranks their node's first) build it once; a
    sidecar that shows late on a node is waited for (it was 'no such file' before)."""
    from tests.dist_utils import run_distributed

    s = setup
    truth = [tokenize_row(s.tok, r.data, r.source, i) for i, r in enumerate(read_rows(s.train))]
    for case, local_ranks, seconds, late in (("one-node", (0, 1), 5, 0), ("two-nodes", (0, 0), 5, 0),
                                             ("shown-late", (0, 0), 0, 4)):
        found = run_distributed(_cache_built_by_one, 2, local_ranks, str(tmp_path / f"{case}.store"),
                                str(tmp_path / case), str(s.model), str(s.train), seconds, late)
        (builds, prefix, samples), (other_builds, other_prefix, other_samples) = found
        assert builds + other_builds == 1 and prefix == other_prefix, (case, found)
        assert samples == other_samples == len(truth), (case, found)
        ds = IndexedDataset(prefix)
        assert [ds.sample(i) for i in range(len(ds))] == truth


def test_a_blend_weighted_3_to_1_draws_3_to_1(setup):
    """--train-data 3 A 1 B: the weights are shares (3/4, 1/4), and the engine is fed 3 items of
    A for each of B: by the greedy rule, exactly 3k and k after 4k items."""
    s = setup
    if not (s.tmp / "b.idx").exists():
        preprocess(s.tmp / "b.jsonl", s.tmp / "b", s.model, Settings(), workers=1, progress=False)
    args = SimpleNamespace(seq_length=L, overlong="truncate", pack=False, seed=3, train_iters=20, epochs=None,
                           prompt_key="prompt", response_key="response")
    parts = load_parts(["3", str(s.tmp / "a"), "1", str(s.tmp / "b")], "--train-data", s.tok, s.model, args, False)
    assert [w for w, _ in parts] == [0.75, 0.25]
    batches = TrainBatches(parts, args, 1, 0, None, 1, 4)
    pos = batches.start()
    for it in range(1, 21):
        _, _, pos = batches.next(pos)
        assert pos.drawn == [3 * it, it], it


def train(s, name, data, *extra, n=0, runner="deepspeed"):
    out = s.tmp / name
    result = launch(n, "--model", s.model, "--train-data", *data, "--seq-length", L, "--loss", "ce",
                    "--save", out, "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json", *extra, runner=runner)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_metrics(out), result.stdout


@pytest.fixture(scope="module")
def epoch_runs(setup):
    """One epoch at --lr 0 from the raw file and from the prefix, unpacked (g 16) and packed (g 1)."""
    s, runs = setup, {}
    plain = ("--micro-batch-size", 8, "--global-batch-size", 16, "--epochs", 1, "--lr", 0)
    packed = ("--pack", "--micro-batch-size", 1, "--global-batch-size", 1, "--epochs", 1, "--lr", 0)
    runs["raw"] = train(s, "raw", [s.train], *plain)
    runs["prefix"] = train(s, "prefix", [s.tmp / "plain"], *plain)
    runs["raw-pack"] = train(s, "raw-pack", [s.train], *packed)
    runs["prefix-pack"] = train(s, "prefix-pack", [s.tmp / "packed1"], *packed)
    return runs


def dense_loss(s) -> float:
    """Token-mean cross-entropy of every row under the HF model itself (float64 log-softmax)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(s.model).eval()
    samples = [tokenize_row(s.tok, r.data, r.source, i) for i, r in enumerate(read_rows(s.train))]
    b = collate(samples, 0)
    with torch.no_grad():
        logp = model(b["input_ids"]).logits.double().log_softmax(-1)
    keep = b["loss_mask"] > 0
    return -logp.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean().item()


def test_prefix_trains_like_the_raw_file_and_like_transformers(setup, epoch_runs):
    truth = dense_loss(setup)
    for raw, prefix in (("raw", "prefix"), ("raw-pack", "prefix-pack")):
        a, b = epoch_runs[raw][0], epoch_runs[prefix][0]
        assert len(a) == len(b) == (2 if raw == "raw" else IndexedDataset(setup.tmp / "packed1").packs)
        for x, y in zip(a, b):
            for key in ("loss", "loss_ce", "loss_idft", "phi_mean", "loss_tokens", "tokens"):
                # phi = log p + H nearly cancels (about -0.03 from terms of about 10): an fp32 rounding
                # of the terms is a relative 1e-6 of the mean, so it gets an absolute tolerance too
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-6 if key == "phi_mean" else 0), \
                    (prefix, x["iteration"], key)
        # one epoch covers every row once: the token-weighted mean of the iterations is the dense loss
        epoch = sum(m["loss_ce"] * m["loss_tokens"] for m in b) / sum(m["loss_tokens"] for m in b)
        assert epoch == pytest.approx(truth, rel=1e-5), prefix
    assert "train.jsonl: 32 rows -> 32 samples (0 truncated, 0 dropped as longer than --seq-length)" \
        in epoch_runs["raw"][1]
    assert len(list((setup.tmp / "cache").glob("train-*.idx"))) == 2  # raw file cached once per settings


def test_blend_draws_follow_the_weights(setup):
    """The items fed to the engine: part a (weight 3/4, a prefix) and part b (1/4, a raw file via the
    cache) told apart by their tokens. Greedy draws keep every part within one item of w * t."""
    s = setup
    args = SimpleNamespace(seq_length=L, overlong="truncate", pack=False, seed=7, train_iters=50, epochs=None,
                           prompt_key="prompt", response_key="response")
    preprocess(s.tmp / "b.jsonl", s.tmp / "b", s.model, Settings(), workers=1, progress=False)
    a, b = IndexedDataset(s.tmp / "a"), IndexedDataset(s.tmp / "b")
    parts = [(0.75, Part("a", a, args, False)), (0.25, Part("b", b, args, False))]
    batches = TrainBatches(parts, args, 1, 0, None, 2, 4)
    ids = {tuple(ds.sample(i).input_ids): (name, i) for name, ds in (("a", a), ("b", b)) for i in range(len(ds))}
    assert len(ids) == 32
    pos, seen = batches.start(), []
    for _ in range(50):
        micro, counts, pos = batches.next(pos)
        for inputs, (targets, _) in micro:
            for row, n in zip(inputs[0], (targets != -100).sum(1)):  # n + 1 tokens in a sample of n targets
                seen.append(ids[tuple(row[:n + 1].tolist())])
        t = len(seen)
        drawn = {p: sum(x[0] == p for x in seen) for p in "ab"}
        assert abs(drawn["a"] - 0.75 * t) <= 1 and abs(drawn["b"] - 0.25 * t) <= 1, (t, drawn)
    assert pos.drawn == [150, 50]
    # each part goes through all of its rows once per epoch, in a new order each epoch
    a_rows = [i for p, i in seen if p == "a"]
    assert [sorted(a_rows[k:k + 16]) for k in range(0, 144, 16)] == [list(range(16))] * 9
    assert a_rows[:16] != a_rows[16:32]


def test_one_part_epochs_skip_the_short_tail():
    """One part of 16 items, global batch 6: an epoch is two whole batches (12 items); iteration 3
    starts epoch 1's permutation and items 12-15 of epoch 0's order are never drawn."""
    from megatron_onpolicy.data.blend import permutation
    args = SimpleNamespace(seed=5, pack=False, train_iters=4, epochs=None)
    batches = TrainBatches([(1.0, SimpleNamespace(items=16, path="p"))], args, 1, 0, None, 1, 6)
    orders = [permutation(16, 5, 0, epoch).tolist() for epoch in (0, 1)]  # the orders, not the batching
    expected = [orders[0][:6], orders[0][6:12], orders[1][:6], orders[1][6:12]]
    pos = batches.start()
    for it, want in enumerate(expected, 1):
        picks, pos = batches.draws(pos)
        assert picks == [(0, j) for j in want], it
        assert pos.drawn == [6 * it]
        # after 6 * it items, of which 12 an epoch: the position counts whole-batch epochs too
        assert batches.where(pos) == {"epoch": it // 2, "epoch_position": 6 * (it % 2)}, it
    assert orders[0][12:] and not set(orders[0][12:]) & set(orders[0][:12])  # the tail skipped in epoch 0


def test_validation_batches_are_read_when_validation_runs(setup, monkeypatch):
    """A DP rank's share, m samples at a time, collated on each pass: nothing read or held before.
    A rank without any sample gets one batch that counts no token."""
    args = SimpleNamespace(seq_length=L, overlong="truncate")
    part = Part("a", IndexedDataset(setup.tmp / "a"), args, False)
    reads = []
    item = part.item
    monkeypatch.setattr(part, "item", lambda j: reads.append(j) or item(j))
    valid = ValidBatches(part, 2, 3, 1)
    assert reads == [] and len(valid) == 3  # rows 1, 4, 7, 10, 13 of 16
    for _ in range(2):
        batches = list(valid)
        assert reads[-5:] == [1, 4, 7, 10, 13] and len(batches) == 3
        for (inputs, (targets, mask)), rows in zip(batches, ([1, 4], [7, 10], [13])):
            expected = collate([item(j) for j in rows], 0)
            assert torch.equal(inputs[0], expected["input_ids"]) and torch.equal(mask, expected["loss_mask"])
    (_, (_, mask)), = ValidBatches(part, 2, 32, 20)
    assert not mask.any()


def test_a_middle_pipeline_stage_reads_nothing(setup, monkeypatch):
    """DeepSpeed loads micro-batches on the first and last stages only: a middle stage gets as many
    placeholders, reads no item, and keeps the same data position as the stages that read."""
    args = SimpleNamespace(seq_length=L, overlong="truncate", pack=False, seed=7, train_iters=3, epochs=None)
    part = Part("a", IndexedDataset(setup.tmp / "a"), args, False)
    reads = []
    item = part.item
    monkeypatch.setattr(part, "item", lambda j: reads.append(j) or item(j))
    reader, middle = (TrainBatches([(1.0, part)], args, 1, 0, None, 2, 4, reads=r) for r in (True, False))
    pos_r = pos_m = reader.start()
    for _ in range(3):
        micro, counts, pos_r = reader.next(pos_r)
        assert len(micro) == 2 and counts["tokens"] > 0
        micro, counts, pos_m = middle.next(pos_m)
        assert micro == [None, None] and counts is None and pos_m == pos_r
    assert len(reads) == 12
    valid = ValidBatches(part, 2, 3, 1, reads=False)
    assert list(valid) == [None] * 3 and len(reads) == 12


def test_resumed_blend_repeats_the_uninterrupted_run(setup):
    s = setup
    blend = ["0.7", s.tmp / "a", "0.3", s.tmp / "b.jsonl"]
    args = ("--micro-batch-size", 2, "--global-batch-size", 4, "--train-iters", 6, "--lr", "1e-2",
            "--save-interval", 3)
    full, out = train(s, "blend", blend, *args)
    assert "weight 0.7" in out and "weight 0.3" in out
    shutil.copytree(s.tmp / "blend", s.tmp / "blend-resumed")
    (s.tmp / "blend-resumed" / "latest").write_text("iter_0000003")
    shutil.rmtree(s.tmp / "blend-resumed" / "iter_0000006")
    resumed, _ = train(s, "blend-resumed", blend, *args, "--load", s.tmp / "blend-resumed")
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert full[1]["loss"] != pytest.approx(full[0]["loss"], rel=1e-3), "the lr must move the loss"
    for x, y in zip(full[3:], resumed[3:]):
        for key in ("loss", "grad_norm", "lr", "phi_mean", "loss_tokens", "epoch", "epoch_position"):
            assert x[key] == y[key], (x["iteration"], key)


def test_bad_files_fail_with_one_line_naming_the_file(setup, tmp_path):
    s = setup
    other = tmp_path / "other-tok"
    tok = load_tokenizer(s.model)
    tok.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    tok.save_pretrained(other)
    for name in ("short", "corrupt"):
        for ext in ("bin", "idx", "json"):
            shutil.copy(s.tmp / f"plain.{ext}", tmp_path / f"{name}.{ext}")
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate((tmp_path / "short.bin").stat().st_size - 6)
    idx = bytearray((tmp_path / "corrupt.idx").read_bytes())
    idx[-20] ^= 0x40
    (tmp_path / "corrupt.idx").write_bytes(idx)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": 3}\n')
    preprocess(s.tmp / "a.jsonl", tmp_path / "foreign", other, Settings(), workers=1, progress=False)
    train_cmd = [sys.executable, str(ROOT / "launch" / "pretrain_idft.py"), "--model", str(s.model),
                 "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1",
                 "--deepspeed_config", str(ROOT / "ds_configs" / "zero1_fp32.json")]
    cases = {  # name: (command, text expected in the one error line)
        "foreign": (train_cmd + ["--train-data", str(tmp_path / "foreign")], "foreign.json: made with tokenizer"),
        "short": (train_cmd + ["--train-data", str(tmp_path / "short")], "short.bin: "),
        "corrupt": (train_cmd + ["--train-data", str(tmp_path / "corrupt")], "corrupt.idx: corrupt"),
    }
    procs = {name: subprocess.Popen(cmd + ["--save", str(tmp_path / f"{name}-out")], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in cases.items()}
    # a bad row: its file and line (the blank line 2 counted), and no output files, not even partial ones
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'response' must be a string"):
        preprocess(tmp_path / "bad.jsonl", tmp_path / "bad", s.model, Settings(), workers=1, progress=False)
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert p.returncode == 2 and len(errors) == 1 and cases[name][1] in errors[0], (name, err[-2000:])
        assert not (tmp_path / f"{name}-out").exists(), name
    assert sorted(p.name for p in tmp_path.iterdir() if "bad" in p.name) == ["bad.jsonl"]


def test_a_killed_build_leaves_nothing_behind_the_next_one(setup, tmp_path):
    """A build killed with SIGKILL cannot clean up: the next build of the prefix on this host removes
    its folder, not a running build's, nor one of another host."""
    s, bin_path = setup, tmp_path / "x.bin"
    running, lock = _claim_tmp(bin_path)
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from pathlib import Path; from megatron_onpolicy.data.preprocess import _claim_tmp\n"
        "tmp, lock = _claim_tmp(Path(sys.argv[1])); (tmp / 'bin').write_bytes(bytes(1000))\n"
        "print(tmp.name, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)"), str(bin_path)], cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    dead = tmp_path / killed.stdout.strip()
    other_host = tmp_path / f".x.bin.tmp-not-{socket.gethostname()}-1234"
    other_host.mkdir()
    (other_host / "lock").touch()
    assert (dead / "bin").exists() and (dead / "lock").exists()
    preprocess(s.tmp / "a.jsonl", tmp_path / "x", s.model, Settings(), workers=1, progress=False)
    left = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left() == sorted([running.name, other_host.name])
    lock.close()  # the running build ends without cleaning up: now it is a dead one
    preprocess(s.tmp / "a.jsonl", tmp_path / "x", s.model, Settings(), workers=1, progress=False)
    assert left() == [other_host.name]
    assert (tmp_path / "x.bin").read_bytes() == (s.tmp / "a.bin").read_bytes()


def test_a_worker_that_dies_fails_the_build_naming_its_rows(setup, tmp_path):
    """A worker killed mid-build (here: a row too long for the memory it may use, so that the tokenizers
    library aborts the process, as the OOM killer would kill it) fails the build with one line naming the rows
    it was tokenizing, and no output, rather than waiting forever for that chunk's result."""
    import resource
    rows = [json.dumps({"prompt": "q", "response": "word " * n}) for n in (3, 4, 6_000_000, 5, 6)]
    (tmp_path / "big.jsonl").write_text("\n".join(rows) + "\n")
    cap = 3 << 29  # 1.5 GiB of heap per process, inherited by the spawned workers; the long row needs more

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "big.jsonl"),
           "--output-prefix", str(tmp_path / "big"), "--model", str(setup.model), "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=limit_memory, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        proc.communicate()
        pytest.fail("the build hangs on a dead worker")
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert proc.returncode == 2 and len(errors) == 1, err[-3000:]
    assert f"{tmp_path / 'big.jsonl'}: a worker process died tokenizing rows 0-4 (lines 1-5)" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]  # no outputs, no temporary folder


def test_a_build_is_on_disk_before_it_takes_its_names(setup, tmp_path, monkeypatch):
    """The .bin and .idx are synced (os.fsync on their inodes) before they are renamed into place,
    and the folder after the sidecar: a node lost a moment later must not leave a .bin zero-filled
    at its full size, which neither the sizes nor the .idx's CRC would catch."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.fstat(fd).st_ino), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(Path(dst).name), real_replace(src, dst)))
    preprocess(setup.tmp / "a.jsonl", tmp_path / "x", setup.model, Settings(), workers=1, progress=False)
    for name in "x.bin", "x.idx":
        assert (tmp_path / name).stat().st_ino in events[:events.index(name)], name
    assert events.index("x.bin") < events.index("x.idx") < events.index("x.json")
    assert tmp_path.stat().st_ino in events[events.index("x.json"):]


def test_parquet_and_datasets_folder_stream_to_the_same_bytes(setup, tmp_path, monkeypatch):
    """Row groups / dataset slices smaller than the file, so that streaming crosses their borders."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_onpolicy.data import preprocess as pre
    monkeypatch.setattr(pre, "CHUNK", 5)
    s = setup
    rows = [r.data for r in read_rows(s.tmp / "a.jsonl")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=3)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "a_ds"))
    for name, source in (("jsonl", s.tmp / "a.jsonl"), ("parquet", tmp_path / "a.parquet"), ("ds", tmp_path / "a_ds")):
        preprocess(source, tmp_path / name, s.model, Settings(seq_length=L, pack=True), workers=1, progress=False)
    for name in ("parquet", "ds"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"{name}.{ext}").read_bytes() == (tmp_path / f"jsonl.{ext}").read_bytes(), (name, ext)
    assert json.loads((tmp_path / "ds.json").read_text())["source"]["rows"] == 16
    # Row numbers count on across chunks (16 rows in chunks of 5): sample i is row i's tokenize_row.
    ds = IndexedDataset(tmp_path / "jsonl")
    assert ds.rows.tolist() == list(range(16))
    assert [ds.sample(i) for i in range(16)] == [tokenize_row(s.tok, row, "", i) for i, row in enumerate(rows)]

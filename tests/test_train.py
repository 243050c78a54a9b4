"""launch/pretrain_idft.py end to end on CPU (gloo), run as users run it (deepspeed, torchrun or
plain python), on a tiny random Llama (4 layers, hidden 64, tied embeddings) with the SmolLM2
tokenizer: the loss is the global token mean whatever the layout and batch split, TP x PP trains
like one process, a resumed run repeats the uninterrupted one, the HF export matches, bad input
fails cleanly."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import numpy as np
import pytest
import torch
import transformers
from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker
from safetensors.torch import load_file

from megatron_onpolicy.data import collate, read_rows, tokenize_row
from megatron_onpolicy.parallel import state
from megatron_onpolicy.parallel.state import first_host, slurm_env
from megatron_onpolicy.train import checkpoint
from megatron_onpolicy.train.args import parse_args
from megatron_onpolicy.train.export import plan_files
from megatron_onpolicy.train.metrics import MetricsLog
from megatron_onpolicy.train.optim import lr_at, make_optimizer, make_scheduler
from tests.dist_utils import free_port, one_process_group, run_distributed
from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

KINDS = ("ce", "dft", "idft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:32]))
    (tmp / "valid.jsonl").write_text("".join(rows[32:40]))
    return SimpleNamespace(tmp=tmp, model=make_tiny_model(tmp / "tiny"), train=tmp / "train.jsonl",
                           valid=tmp / "valid.jsonl")


def run(s, n, name, tp, pp, micro, glob, *extra, runner="deepspeed", config="zero1_fp32.json"):
    out = s.tmp / name
    result = launch(n, "--model", s.model, "--train-data", s.train, "--seq-length", 128,
                    "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                    "--micro-batch-size", micro, "--global-batch-size", glob, "--save", out,
                    "--deepspeed_config", ROOT / "ds_configs" / config, *extra, runner=runner)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return read_metrics(out)


TRAINED = ("--loss", "ce", "--lr", "1e-2", "--train-iters", 4, "--save-interval", 2, "--valid-data")


@pytest.fixture(scope="module")
def runs(setup):
    """(T, P, DP) layouts with different micro-batch / accumulation splits of a global batch of 4."""
    s = setup
    return {
        # two trained runs (real lr, clipping active), the reference one also with TensorBoard
        (1, 1, 1): run(s, 0, "ref", 1, 1, 4, 4, *TRAINED, s.valid, "--keep-last", 1,
                       "--tensorboard-dir", s.tmp / "tb"),
        (2, 2, 1): run(s, 4, "tp2pp2", 2, 2, 2, 4, *TRAINED, s.valid, "--export-hf", s.tmp / "tp2pp2-hf"),
        # --lr 0, one iteration each
        # and every launcher: deepspeed above, mpirun, srun (its environment), torchrun
        (2, 1, 1): run(s, 2, "tp2", 2, 1, 1, 4, "--loss", "dft", "--lr", 0, "--train-iters", 1, runner="mpirun"),
        (1, 2, 1): run(s, 2, "pp2", 1, 2, 2, 4, "--loss", "idft", "--lr", 0, "--train-iters", 1, runner="slurm"),
        (1, 1, 2): run(s, 2, "dp2", 1, 1, 1, 4, "--loss", "idft", "--lr", 0, "--train-iters", 1, runner="torchrun"),
    }


def test_iteration_one_loss_is_the_global_token_mean_in_every_layout(runs):
    ref = runs[(1, 1, 1)][0]
    for layout, metrics in runs.items():
        first = metrics[0]
        for kind in KINDS:  # every objective is reported, whichever one is trained
            assert first[f"loss_{kind}"] == pytest.approx(ref[f"loss_{kind}"], rel=1e-5), (layout, kind)
        kind = {(2, 1, 1): "dft", (1, 2, 1): "idft", (1, 1, 2): "idft"}.get(layout, "ce")
        assert first["loss"] == first[f"loss_{kind}"], layout
        assert first["loss_tokens"] == ref["loss_tokens"] and first["tokens"] == ref["tokens"], layout
        assert first["phi_mean"] == pytest.approx(ref["phi_mean"], rel=1e-5, abs=1e-6), layout


def test_tp2_pp2_trains_like_one_process(runs):
    ref, par = runs[(1, 1, 1)], runs[(2, 2, 1)]
    assert [m["iteration"] for m in par] == [1, 2, 3, 4]
    assert ref[1]["loss"] != pytest.approx(ref[0]["loss"], rel=1e-3), "the lr must move the loss"
    # the lr each step applied (the optimizer's, read before the step): linear decay by default
    assert [m["lr"] for m in ref] == pytest.approx([1e-2, 0.75e-2, 0.5e-2, 0.25e-2], rel=1e-12)
    assert ref[0]["grad_norm"] > 1.0, "clipping (at 1.0) must be active"
    for a, b in zip(ref, par):
        for key in ("loss", "grad_norm", "phi_mean", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["iteration"], key)
    assert par[-1]["valid_loss"] == pytest.approx(ref[-1]["valid_loss"], rel=1e-4)
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "phi_mean", "phi_std",
                "gamma_mean", "lam", "frac_phi_lt_-1", "epoch", "epoch_position"):
        assert key in par[0], key


def test_idft_lam_ramps_with_progress(setup):
    """DESIGN.md section 2: lam(t), t = step / total_steps (steps from 0), is 0 during the warmup
    ratio, then linear over the transition ratio. At lam 0 the trained IDFT weight p^g has g = 1: the
    loss applied is DFT's, on the same tokens."""
    metrics = run(setup, 0, "idft-ramp", 1, 1, 4, 4, "--loss", "idft", "--lr", 0, "--train-iters", 4,
                  "--idft-warmup-ratio", 0.5, "--idft-transition-ratio", 0.5)
    assert [m["lam"] for m in metrics] == [0.0, 0.0, 0.0, 0.5]  # t = 0, 1/4, 2/4, 3/4
    # No --save-interval: the last iteration is saved all the same.
    assert (setup.tmp / "idft-ramp" / "latest").read_text() == "iter_0000004"
    for m in metrics[:3]:
        assert m["loss"] == pytest.approx(m["loss_dft"], rel=1e-6), m["iteration"]
    assert metrics[3]["loss"] != pytest.approx(metrics[3]["loss_dft"], rel=1e-3)


def test_metrics_files(setup, runs):
    ref = setup.tmp / "ref"
    # --keep-last 1: only the newest checkpoint, complete and named by `latest`
    assert sorted(p.name for p in ref.glob("iter_*")) == ["iter_0000004"]
    assert (ref / "latest").read_text() == "iter_0000004"
    assert (ref / "iter_0000004" / "complete.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(setup.tmp / "tb"), size_guidance={"histograms": 0}).Reload()
    assert {"train/loss", "train/phi_mean", "valid/valid_loss"} <= set(events.Tags()["scalars"])
    assert {"train/phi", "train/gamma"} <= set(events.Tags()["histograms"])
    assert len(events.Scalars("train/loss")) == 4


def test_resume_repeats_the_uninterrupted_run(setup, runs):
    """Resume a copy of the (2,2,1) run from its iteration-2 checkpoint, as if it had died while
    saving iteration 4: the torn partial save must be ignored, then replaced."""
    s, src, dst = setup, setup.tmp / "tp2pp2", setup.tmp / "resumed"
    shutil.copytree(src, dst)
    (dst / "latest").write_text("iter_0000002")
    (dst / "iter_0000004").rename(dst / ".partial-iter_0000004")
    (dst / ".partial-iter_0000004" / "complete.json").unlink()
    for f in (dst / ".partial-iter_0000004").glob("*.pt"):
        f.write_bytes(b"torn")
    # and a file only a save at DP 4 writes, which this run's save would not overwrite
    (dst / ".partial-iter_0000004" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(b"torn")
    resumed = run(s, 4, "resumed", 2, 2, 2, 4, *TRAINED, s.valid, "--load", dst, runner="torchrun")
    full = runs[(2, 2, 1)]
    assert [m["iteration"] for m in resumed] == [1, 2, 3, 4]  # records after the checkpoint replaced
    for a, b in zip(full[2:], resumed[2:]):
        for key in ("loss", "grad_norm", "lr", "phi_mean", "valid_loss", "epoch", "epoch_position", "loss_tokens"):
            assert a.get(key) == b.get(key), (a["iteration"], key)
    assert (dst / "latest").read_text() == "iter_0000004" and (dst / "iter_0000004" / "complete.json").is_file()
    assert sorted(p.name for p in dst.glob("*iter_*")) == ["iter_0000002", "iter_0000004"]
    assert not (dst / "iter_0000004" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").exists()


def test_keep_last_never_removes_the_checkpoint_just_saved(tmp_path):
    """A crash between renaming a save into place (iter 10) and pointing `latest` at it: the rerun
    resumes from iter 5 and saves iter 6. --keep-last 1 keeps iter 6, not the stray iter 10, and
    removes iter 5 and a crashed save's leftovers."""
    for name, done in (("iter_0000005", True), ("iter_0000010", True), ("iter_0000006", True),
                       (".partial-iter_0000007", False), ("iter_0000004", False)):
        (tmp_path / name).mkdir()
        if done:
            (tmp_path / name / checkpoint.MARKER).write_text("{}")
    checkpoint._prune(tmp_path, 1, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000010"]
    checkpoint._prune(tmp_path, None, 11)  # no --keep-last: every complete checkpoint stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000006", "iter_0000010"]


def _resume_points(rank, world, views):
    """Each rank's resume point from its own view (--save, --load) of the file system."""
    try:
        point = checkpoint.resume_point(*views[rank])
    except FileNotFoundError as e:
        point = (str(e), getattr(e, "every_rank", False))
    found = [None] * world
    torch.distributed.all_gather_object(found, point)
    return found


def test_every_rank_resumes_from_the_checkpoint_rank_0_found(tmp_path):
    """Nodes whose file systems disagree (one still shows an older `latest`; one shows no checkpoint
    in --save at all) load what rank 0 found; each rank chose for itself before, so those loaded
    another iteration, or started afresh beside ranks that resumed."""
    for name, latest in (("newer", "iter_0000002"), ("older", "iter_0000001")):
        for tag in ("iter_0000001", "iter_0000002"):
            (tmp_path / name / tag).mkdir(parents=True)
            (tmp_path / name / tag / checkpoint.MARKER).write_text("{}")
        (tmp_path / name / "latest").write_text(latest)
    (tmp_path / "empty").mkdir()
    newer, older, empty = (str(tmp_path / name) for name in ("newer", "older", "empty"))
    point = (newer, "iter_0000002")
    assert run_distributed(_resume_points, 2, [(newer, None), (older, None)]) == [point, point]
    assert run_distributed(_resume_points, 2, [(newer, None), (empty, None)]) == [point, point]
    assert run_distributed(_resume_points, 2, [(empty, newer), (empty, older)]) == [point, point]
    assert run_distributed(_resume_points, 2, [(empty, None), (newer, None)]) == [(None, None)] * 2
    gone = f"--load {tmp_path / 'gone'}: no such folder"  # rank 0's error, raised on every rank alike
    assert run_distributed(_resume_points, 2, [(empty, str(tmp_path / "gone")), (empty, newer)]) == [(gone, True)] * 2


def test_a_save_is_on_disk_before_latest_names_it_and_a_crash_leaves_the_one_before(tmp_path, monkeypatch):
    """checkpoint.save on a DeepSpeed engine: every file of the new checkpoint, and the new text of
    `latest`, synced to disk (os.fsync on their inodes) before `latest` is replaced, and its folder
    after, since the save then prunes the checkpoint before (a node lost a moment later would
    otherwise take both). A crash before the rename into place leaves `latest` naming the one before."""
    from megatron_onpolicy.train.batches import Position

    monkeypatch.setenv("LOCAL_RANK", "0")  # (DeepSpeed asks for it)
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (synced.append(Path(dst).name), real_replace(src, dst)))
    args = SimpleNamespace(lr=1e-3, min_lr=0.0, lr_warmup_iters=0, lr_decay_iters=None, lr_decay_style="linear",
                           weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    with one_process_group():
        module = torch.nn.Linear(4, 4)
        optimizer = make_optimizer(module, args)
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer,
                                          lr_scheduler=make_scheduler(optimizer, args, 10),
                                          config={"train_batch_size": 1, "gradient_clipping": 1.0,
                                                  "zero_optimization": {"stage": 1}})
        checkpoint.save(engine, tmp_path, 2, Position(), {"x": 1}, keep_last=1)
        files = [p for p in (tmp_path / "iter_0000002").rglob("*") if p.is_file()]
        assert sorted(p.name for p in files) == ["complete.json", "mp_rank_00_model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        latest = synced.index("latest")
        assert {p.stat().st_ino for p in files + [tmp_path / "latest"]} <= set(synced[:latest])
        assert tmp_path.stat().st_ino in synced[latest:]  # the renames into it

        def node_lost(*_):
            raise OSError("node lost")
        monkeypatch.setattr(checkpoint, "replace_dir", node_lost)
        with pytest.raises(OSError, match="node lost"):
            checkpoint.save(engine, tmp_path, 3, Position(), {"x": 1}, keep_last=1)
    assert checkpoint.read_checkpoint(tmp_path) == ("iter_0000002", {"iteration": 2, "x": 1})
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [".partial-iter_0000003", "iter_0000002"]


def rng_draws():
    with get_cuda_rng_tracker().fork():  # the TP ranks' own stream
        tracker = torch.rand(2).tolist()
    return random.random(), np.random.rand(), torch.rand(2).tolist(), tracker


def test_a_checkpoint_s_rng_states_restore_every_stream_a_run_draws_from():
    """No test model has dropout, so a resumed run's losses would not show a stream left
    unrestored: the state a checkpoint keeps must give back the same draws from each."""
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    try:
        saved = checkpoint._rng_state()
        first = rng_draws()
        rng_draws()
        checkpoint._set_rng_state(saved)
        assert rng_draws() == first
    finally:
        tracker.reset()


def test_metrics_log_replaces_what_a_resumed_run_repeats(tmp_path):
    """MetricsLog as a run uses it, killed after iteration 3 (a torn line), then resumed from its
    iteration-2 checkpoint: each record is on disk once logged; the records and TensorBoard
    points after the checkpoint are replaced, not kept twice, those up to it kept; validation
    scalars under valid/, and phi and gamma each in its own histogram."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def record(iteration, loss):
        return {"iteration": iteration, "loss": loss, "lr": 1e-3, "tokens_per_s": 1.0,
                **({"valid_loss": 0.5, "valid_phi_mean": -1.0} if iteration == 2 else {})}

    tb, phi, gamma = tmp_path / "tb", torch.full((3,), -2.0), torch.full((3,), 0.25)
    log = MetricsLog(tmp_path, tb, 4, 0)
    for iteration in (1, 2, 3):
        log.log(record(iteration, float(iteration)), phi, gamma)
        assert read_metrics(tmp_path)[-1] == record(iteration, float(iteration))  # not in a buffer
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')
    log = MetricsLog(tmp_path, tb, 4, 2)
    for iteration in (3, 4):
        log.log(record(iteration, 10.0 * iteration), phi, gamma)
    log.close()
    assert read_metrics(tmp_path) == [record(1, 1.0), record(2, 2.0), record(3, 30.0), record(4, 40.0)]
    events = EventAccumulator(str(tb), size_guidance={"histograms": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [(e.step, e.value) for e in events.Scalars("valid/valid_loss")] == [(2, 0.5)]
    for tag, value in (("train/phi", -2.0), ("train/gamma", 0.25)):
        assert {(h.histogram_value.min, h.histogram_value.max) for h in events.Histograms(tag)} == {(value, value)}


def test_weight_decay_spares_norms_and_biases_and_the_schedule_sets_the_lr():
    """make_optimizer's groups, on what one AdamW step applies (zero gradients: only the decoupled
    decay moves a weight, by lr * weight_decay of itself), and make_scheduler's lr per step."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    args = SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_iters=None, lr_decay_style="linear",
                           weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    optimizer = make_optimizer(module, args)
    scheduler = make_scheduler(optimizer, args, 10)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in module.parameters()]
    lrs = []
    for step in range(11):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
        if step == 0:  # at lr 0.5, the warmup's first step, the matrix decays by 1 - 0.5 * 0.1
            torch.testing.assert_close(module[0].weight, before[0] * 0.95)
            assert all(torch.equal(p, b) for p, b in zip(list(module.parameters())[1:], before[1:]))
    assert lrs[:3] == [[0.5, 0.5], [1.0, 1.0], [1.0, 1.0]] and lrs[10] == [0.1, 0.1]
    assert lrs[6] == pytest.approx([0.55, 0.55])  # linear, half way from step 2 to 10


def test_exit_interval_exports_only_the_final_model(setup):
    """--exit-interval stops after a checkpoint, short of --train-iters: --export-hf is for the
    model the run was asked to train, written by the run that finishes it."""
    s, hf = setup, setup.tmp / "exit-hf"
    flags = ("--loss", "ce", "--lr", "1e-2", "--train-iters", 2, "--exit-interval", 1, "--export-hf", hf)
    first = run(s, 0, "exit", 1, 1, 4, 4, *flags)
    assert [m["iteration"] for m in first] == [1] and not hf.exists()
    assert (s.tmp / "exit" / "latest").read_text() == "iter_0000001"
    second = run(s, 0, "exit", 1, 1, 4, 4, *flags)
    assert [m["iteration"] for m in second] == [1, 2] and (hf / "config.json").is_file()
    # a model under --max-shard-size: one file, as transformers' save_pretrained writes it, no index
    assert sorted(p.name for p in hf.glob("model*")) == ["model.safetensors"]


def test_a_bf16_run_exports_its_bf16_weights_from_the_run_and_from_the_checkpoint(setup):
    """--export-hf writes the live model's bf16 tensors; tools/export_hf.py builds its engine in the
    checkpoint's precision, so it writes the same tensors (not fp32 copies, twice the bytes)."""
    s, live, offline = setup, setup.tmp / "bf16-hf", setup.tmp / "bf16-exported"
    run(s, 0, "bf16", 1, 1, 4, 4, "--loss", "ce", "--lr", "1e-2", "--train-iters", 1, "--export-hf", live,
        config="zero1_bf16.json")
    result = launch(0, "--load", s.tmp / "bf16", "--out", offline, script="tools/export_hf.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start = load_file(s.model / "model.safetensors")
    a, b = (load_file(d / "model.safetensors") for d in (live, offline))
    assert a.keys() == b.keys() == start.keys()
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"].float(), start["model.norm.weight"].float())  # trained
    for d in (live, offline):
        assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"


def test_hf_export_matches_the_parallel_model(setup, runs):
    """The exported folder loads in transformers; its validation loss and mean phi, computed from
    its logits, equal the (2,2,1) model's own; tools/export_hf.py from the checkpoint agrees."""
    hf_dir = setup.tmp / "tp2pp2-hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    samples = [tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(read_rows(setup.valid))]
    b = collate(samples, 0)
    with torch.no_grad():
        logits = model(b["input_ids"]).logits.double()
    logp = logits.log_softmax(-1)
    keep = b["loss_mask"] > 0
    logp_y = logp.gather(-1, b["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
    entropy = -(logp.exp() * logp).sum(-1)[keep]
    last = runs[(2, 2, 1)][-1]
    assert last["valid_tokens"] == keep.sum()
    assert -logp_y.mean().item() == pytest.approx(last["valid_loss"], rel=1e-5)
    assert (logp_y + entropy).mean().item() == pytest.approx(last["valid_phi_mean"], rel=1e-4, abs=1e-5)

    out = setup.tmp / "exported"
    result = launch(4, "--load", setup.tmp / "tp2pp2", "--out", out, script="tools/export_hf.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # P = 2: one safetensors file per stage, and an index naming every tensor once
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    a, b = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in (hf_dir, out))
    assert a.keys() == b.keys() == index.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Files of at most 100 kB: the 12.6 MB embedding alone in one, each stage's layers (about 150 kB
    # each) over several (a fused qkv's q, k and v may land in different files); the same tensors,
    # all in the index. A crashed export's temporary folder, with a file of its own plan, is not
    # part of it.
    small = setup.tmp / "exported-small"
    (setup.tmp / ".exported-small.partial").mkdir()
    (setup.tmp / ".exported-small.partial" / "model-00099-of-00099.safetensors").write_bytes(b"torn")
    result = launch(4, "--load", setup.tmp / "tp2pp2", "--out", small, "--max-shard-size", "100KB",
                    script="tools/export_hf.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = json.loads((small / "model.safetensors.index.json").read_text())
    files = sorted(small.glob("*.safetensors"))
    assert len(files) > 4 and sorted(set(index["weight_map"].values())) == [f.name for f in files]
    for f in files:
        tensors = load_file(f)
        assert all(index["weight_map"][k] == f.name for k in tensors)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 10**5
    c = {k: v for f in files for k, v in load_file(f).items()}
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    transformers.AutoModelForCausalLM.from_pretrained(small)


def test_an_export_is_on_disk_before_it_replaces_the_one_before(tmp_path, monkeypatch):
    """export_hf over an older export: every file of the new one, and its folder, synced to disk
    (os.fsync on their inodes) before it is renamed into place; the folder holding both synced
    before the old one is removed, so that a node lost a moment later leaves one or the other."""
    from megatron_onpolicy.model.hf_io import load_hf_weights
    from megatron_onpolicy.model.loader import load_arch, load_tokenizer
    from megatron_onpolicy.train.export import export_hf
    from megatron_onpolicy.train.model import build_pipeline, hf_names

    folder, out = make_tiny_model(tmp_path / "tiny", layers=1), tmp_path / "hf"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    events, real_fsync, real_rename, real_rmtree = [], os.fsync, os.rename, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.fstat(fd).st_ino), real_fsync(fd)))
    monkeypatch.setattr(os, "rename", lambda src, dst: (events.append(("rename", Path(dst).name)),
                                                        real_rename(src, dst)))
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", Path(p).name)),
                                                          real_rmtree(p, **kw)))
    monkeypatch.setattr(state, "_TOPOLOGY", None)
    monkeypatch.setattr(state, "_GROUPS", {})
    monkeypatch.setenv("LOCAL_RANK", "0")  # (DeepSpeed asks for it)
    with one_process_group():
        deepspeed.init_distributed("gloo", verbose=False)  # DeepSpeed's PipelineModule uses its comm
        state.initialize_model_parallel(1, 1)
        _, arch = load_arch(str(folder))
        pipe = build_pipeline(arch, state.get_tensor_model_parallel_group(), state.topology(), None)
        load_hf_weights(pipe, folder, hf_names(pipe))
        export_hf(pipe, load_tokenizer(folder), out)
    files = list(out.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f.name for f in files}
    assert "stale.json" not in {f.name for f in files}
    moved = events.index(("rename", "hf"))
    assert {f.stat().st_ino for f in files + [out]} <= set(events[:moved])
    assert tmp_path.stat().st_ino in events[moved:events.index(("rmtree", f"hf.old-{os.getpid()}"))]


def test_export_files_follow_the_stages():
    """Each stage's tensors in order, in files of at most max_bytes (a larger tensor alone), the
    tied embedding only in the first stage that has it; files numbered across stages."""
    stages = [(0, {"embed": 10, "l0.q": 4, "l0.k": 4, "l0.v": 4}), (1, {"l1.q": 4, "norm": 1, "embed": 10})]
    assert plan_files(stages, 9) == [(0, ["embed"]), (0, ["l0.q", "l0.k"]), (0, ["l0.v"]), (1, ["l1.q", "norm"])]
    assert plan_files(stages, 100) == [(0, ["embed", "l0.q", "l0.k", "l0.v"]), (1, ["l1.q", "norm"])]
    # "at most": tensors that fill a file exactly share it
    assert plan_files([(0, {"a": 4, "b": 5, "c": 1})], 9) == [(0, ["a", "b"]), (0, ["c"])]


def test_packing_across_pipeline_stages(setup):
    s = setup
    args = ("--pack", "--seq-length", 512, "--loss", "idft", "--lr", 0, "--train-iters", 1)
    one = run(s, 0, "pack1", 1, 1, 2, 2, *args)[0]
    two = run(s, 2, "pack2", 1, 2, 1, 2, *args, runner="torchrun")[0]
    for key in ("loss", "loss_ce", "phi_mean", "loss_tokens"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["tokens"] > 2 * 128, "a packed row holds several samples"


BAD = {  # name: (train file text, extra flags, expected text in the error line)
    "empty": ("", (), "no rows"),
    "overlong": (None, ("--seq-length", 16, "--overlong", "drop"), "all 32 rows are longer than --seq-length 16"),
    "malformed": ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', (), "malformed.jsonl:2:"),
    "batch": (None, ("--micro-batch-size", 3), "global batch size 4 is not divisible by micro-batch size 3"),
    "mismatch": (None, ("--deepspeed_config", "MISMATCH"), "train_batch_size is 8 but --global-batch-size gives 4"),
    "load": (None, ("--load", "MISSING"), "no such folder"),
}


def test_bad_input_fails_with_one_clear_line_and_writes_nothing(setup, tmp_path):
    (tmp_path / "mismatch.json").write_text(json.dumps({"train_batch_size": 8}))
    procs = {}
    for name, (text, extra, _) in BAD.items():
        data = setup.train
        if text is not None:
            data = tmp_path / f"{name}.jsonl"
            data.write_text(text)
        extra = [str(tmp_path / "mismatch.json") if a == "MISMATCH" else str(tmp_path / "nope") if a == "MISSING"
                 else str(a) for a in extra]
        cmd = [sys.executable, str(ROOT / "launch" / "pretrain_idft.py"), "--model", str(setup.model),
               "--train-data", str(data), "--micro-batch-size", "2", "--global-batch-size", "4",
               "--train-iters", "2", "--seq-length", "128", "--save", str(tmp_path / f"{name}-out"),
               "--export-hf", str(tmp_path / f"{name}-hf"),
               "--deepspeed_config", str(ROOT / "ds_configs" / "zero1_fp32.json"), *extra]
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("pretrain_idft: error:")]
        assert p.returncode != 0, name
        assert len(errors) == 1 and BAD[name][2] in errors[0], (name, err[-2000:])
        assert not (tmp_path / f"{name}-out").exists() and not (tmp_path / f"{name}-hf").exists(), name


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-a[007-009,012],gpu-b1"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-a007",
                              "MASTER_PORT": "23456"}
    assert [first_host(x) for x in ("node1,node2", "n[1-2]-ib[3-4],x", "a[05]")] == ["node1", "n1-ib3", "a05"]
    # An srun step of 6 tasks on the job's last nodes (srun -n 6 --exclude gpu-a007)
    step = {**env, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "gpu-a[008-009,012]"}
    assert slurm_env(step) == {**slurm_env(env), "WORLD_SIZE": "6", "MASTER_ADDR": "gpu-a008"}
    # Who placed the process: the batch script (no step), srun (its pmi2 plugin too), an MPI launcher.
    assert not state.srun_task(env) and state.srun_task(step) and not state._mpi_launched(step)
    assert not state._mpi_launched({**step, "PMI_RANK": "5", "PMI_SIZE": "6"})  # srun --mpi=pmi2
    assert state._mpi_launched({**step, "PMI_RANK": "17", "PMI_SIZE": "32"})  # mpiexec's proxy step, one a node
    assert state._mpi_launched({**env, "OMPI_COMM_WORLD_RANK": "3"})


def test_a_rank_without_local_rank_takes_its_launchers():
    """RANK exported by a script but not LOCAL_RANK: the local rank is the launcher's, never a
    silent 0 on every rank of a node."""
    ranks = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert state.local_rank_of({**ranks, "SLURM_LOCALID": "1", "SLURM_PROCID": "5"}) == "1"
    assert state.local_rank_of({**ranks, "OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == "2"
    assert state.local_rank_of({**ranks, "MPI_LOCALRANKID": "3"}) == "3"
    assert state.local_rank_of({"RANK": "0", "WORLD_SIZE": "1"}) == "0"
    with pytest.raises(state.ParallelLayoutError, match="RANK is set but LOCAL_RANK is not"):
        state.local_rank_of(ranks)
    # and init_distributed takes it (before: LOCAL_RANK stayed unset)
    child = ("import os\n"
             "from megatron_onpolicy.parallel import state\n"
             "state.init_distributed(0.2)\n"
             "print(os.environ.get('LOCAL_RANK'))\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_LOCALID="3")
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip().splitlines()[-1:] == ["3"], result.stderr[-3000:]


def test_a_plain_process_in_a_batch_script_is_a_job_of_one(tmp_path):
    """The batch script's own environment has SLURM_PROCID 0 and SLURM_NTASKS N: a `python
    tool.py` there joined a world of N and waited for ranks that never came."""
    child = ("import torch.distributed as dist\n"
             "from megatron_onpolicy.parallel import state\n"
             "state.init_distributed(0.2)\n"
             "print(dist.get_world_size())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost")
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip().splitlines()[-1:] == ["1"], result.stderr[-3000:]


def test_an_mpirun_job_takes_its_port_from_the_environment(tmp_path):
    """DeepSpeed's MPI discovery sets MASTER_PORT to 29500 unless told otherwise: two mpirun jobs
    on one node would share the port, and `deepspeed --launcher mpich --master_port P` (which
    exports MASTER_PORT=P to mpirun's ranks) would not get P."""
    port = str(free_port())
    # Each rank writes a file of its own: mpirun forwards the ranks' stdout in pieces, which once
    # interleaved two ranks' lines into "22 P" and " P".
    child = ("import os, sys, torch.distributed as dist\n"
             "from megatron_onpolicy.parallel import state\n"
             "state.init_distributed()\n"
             "seen = f\"{dist.get_world_size()} {os.environ['MASTER_PORT']}\"\n"
             "open(f'{sys.argv[1]}/{dist.get_rank()}', 'w').write(seen)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run([str(Path(sys.executable).parent / "mpirun"), "-np", "2", sys.executable, "-c", child,
                             str(tmp_path)], cwd=ROOT, env={**env, "MASTER_PORT": port}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == [f"2 {port}"] * 2


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_deepspeed_binds_nccl_to_the_gpu_the_task_sees(monkeypatch, launcher):
    """srun --gpus-per-task=1 (or mpirun with one GPU a rank): DeepSpeed's init_process_group binds
    NCCL to cuda:LOCAL_RANK, so LOCAL_RANK must be the GPU ordinal (0) by then, not the task's rank
    on its node (3): torch refuses cuda:3 where one GPU is visible. Under mpirun the rank comes from
    DeepSpeed's MPI discovery, which must therefore run first. (No GPU here: the CUDA calls are
    stand-ins, and so is the MPI discovery; the real one runs in the mpirun layout above.)"""
    from deepspeed.comm import comm as ds_comm

    seen = {}

    class Stop(Exception):
        pass

    def init_distributed(**kwargs):
        seen["LOCAL_RANK"], seen["device"] = os.environ["LOCAL_RANK"], seen.get("device")
        raise Stop

    monkeypatch.setattr(state, "_NODE_RANK", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("device", d))
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    def place():  # (through monkeypatch, so that the variables go with the test)
        for key, value in dict(RANK="3", LOCAL_RANK="3", WORLD_SIZE="8", MASTER_ADDR="x", MASTER_PORT="1").items():
            monkeypatch.setenv(key, value)

    for key in ("RANK", "SLURM_PROCID", "PMI_RANK"):
        monkeypatch.delenv(key, raising=False)
    if launcher == "srun":
        place()
    else:  # what the discovery writes (deepspeed.comm.comm.mpi_discovery)
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
        monkeypatch.setattr(ds_comm, "mpi_discovery", lambda **_: place())
    with pytest.raises(Stop):
        state.init_distributed()
    assert seen == {"LOCAL_RANK": "0", "device": 0} and state.node_local_rank() == 3


def test_distributed_timeout_reaches_the_process_group():
    """--distributed-timeout-minutes (Megatron's flag; DeepSpeed's default is 10 minutes): a node's
    first rank may preprocess a large raw file for longer while the others wait in a collective."""
    child = ("import torch, torch.distributed as dist\n"
             "from megatron_onpolicy.parallel import state\n"
             "state.init_distributed(37)\n"
             "state.initialize_model_parallel(1, 1)\n"
             "for group in (dist.group.WORLD, state.get_data_parallel_group(), dist.new_group([0])):\n"
             "    print(group._get_backend(torch.device('cpu')).options._timeout)\n")
    result = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # the world, our groups, and a group made without a timeout (as DeepSpeed makes its pipeline's)
    assert result.stdout.strip().splitlines()[-3:] == ["0:37:00"] * 3, result.stdout + result.stderr[-3000:]
    assert parse_args(["--train-data", "a", "--train-iters", "1", "--deepspeed_config", "x.json",
                       "--distributed-timeout-minutes", "37"]
                      ).distributed_timeout_minutes == 37


@pytest.mark.parametrize("local_rank, visible, ordinal", [(3, 8, 3), (3, 1, 0), (0, 1, 0)])
def test_a_task_that_sees_one_gpu_keeps_its_rank_on_the_node(monkeypatch, local_rank, visible, ordinal):
    """srun --gpus-per-task=1: LOCAL_RANK becomes the ordinal 0 for DeepSpeed, yet only the node's
    first task may build the data cache (all of them did, each with a pool of workers)."""
    monkeypatch.setattr(state, "_NODE_RANK", None)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert state._local_rank_as_gpu_ordinal(visible) == ordinal
    assert os.environ["LOCAL_RANK"] == str(ordinal)
    assert state.node_local_rank() == local_rank


def test_lr_schedule():
    args = SimpleNamespace(lr=1.0, min_lr=0.1, lr_warmup_iters=2, lr_decay_iters=None, lr_decay_style="cosine")
    lrs = [lr_at(s, args, 10) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[10] == 0.1
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    args.lr_decay_style = "linear"
    assert lr_at(6, args, 10) == pytest.approx(0.55)
    args.lr_decay_style = "constant"
    assert {lr_at(s, args, 10) for s in range(2, 12)} == {1.0}

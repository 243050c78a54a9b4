"""Elastic restarts: a ZeRO-1 run saved at one data-parallel size continues at another (same T and
P) and trains on exactly as the uninterrupted run: the same global batches (the data position is
samples consumed of a DP-independent global batch), and the same fp32 master weights and Adam
moments, re-cut from the old DP ranks' partitions. Checked on what is applied: the next
iterations' losses and gradient norms follow from the restored weights and moments."""
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.train_utils import ROOT, launch, make_tiny_model, read_metrics

FLAGS = ("--seq-length", 128, "--micro-batch-size", 1, "--global-batch-size", 6, "--train-iters", 4, "--loss", "idft",
         "--lr", "1e-2", "--deepspeed_config", ROOT / "ds_configs" / "zero1_fp32.json")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    rows = (ROOT / "data" / "math_sft.jsonl").read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(rows[:32]))
    return SimpleNamespace(tmp=tmp, model=make_tiny_model(tmp / "tiny", layers=2), train=tmp / "train.jsonl")


def run(s, n, name, pp, *extra, runner="torchrun"):
    result = launch(n, "--model", s.model, "--train-data", s.train, "--pipeline-model-parallel-size", pp, *FLAGS,
                    "--save", s.tmp / name, *extra, runner=runner)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_metrics(s.tmp / name)


def continued(s, source, name, n, pp):
    """A copy of `source` as it was after its iteration-2 checkpoint, continued on n ranks."""
    dst = s.tmp / name
    dst.mkdir()
    shutil.copytree(s.tmp / source / "iter_0000002", dst / "iter_0000002")
    (dst / "latest").write_text("iter_0000002")
    metrics = run(s, n, name, pp)
    # DeepSpeed's own step and sample counters, which it saves and restores on a resume at the same
    # DP size, go on from the checkpoint's (an elastic load restores no engine state of its own).
    saved = torch.load(dst / "iter_0000004" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert (saved["global_steps"], saved["global_samples"]) == (4, 4 * 6)
    return metrics


def check(full, resumed):
    assert [m["iteration"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("loss", "grad_norm", "phi_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["iteration"], key)
        assert (b["loss_tokens"], b["epoch_position"], b["lr"]) == (a["loss_tokens"], a["epoch_position"], a["lr"])


@pytest.mark.parametrize("dp", [1, 3])
def test_dp2_continues_at_another_dp(setup, dp):
    if not hasattr(setup, "dp2"):
        setup.dp2 = run(setup, 2, "dp2", 1, "--save-interval", 2)
    assert setup.dp2[1]["loss"] != pytest.approx(setup.dp2[2]["loss"], rel=1e-3), "training must move the loss"
    check(setup.dp2, continued(setup, "dp2", f"dp2-to-dp{dp}", dp, 1))


def test_pp2_dp2_continues_at_dp1(setup):
    full = run(setup, 4, "pp2dp2", 2, "--save-interval", 2)
    check(full, continued(setup, "pp2dp2", "pp2dp2-to-dp1", 2, 2))

"""The trainer's flags from a --config YAML file: parsed as the same flags on the command line
would be (types, choices), and overridden by the command line; the DeepSpeed config they fill in;
the settings a resumed run must keep."""
import json
import re
from types import SimpleNamespace

import pytest

from megatron_onpolicy.train.args import TrainConfigError, parse_args
from megatron_onpolicy.train.checkpoint import check_settings, run_settings
from megatron_onpolicy.train.ds_config import build_ds_config

REQUIRED = ["--train-iters", "1", "--deepspeed_config", "x.json"]


def parse(tmp_path, yaml_text, *argv):
    config = tmp_path / "run.yaml"
    config.write_text(yaml_text)
    return parse_args(["--config", str(config), *REQUIRED, *argv])


def test_a_config_file_reads_as_the_same_flags_on_the_command_line(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string: it must still become the float the flag takes.
    text = ("train-data: a.jsonl\nlr: 1e-4\nseq_length: 512\nloss: dft\npack: true\n"
            "fused_loss: false\nlr-decay-style: cosine\nrecompute-granularity: full\n")
    from_yaml = parse(tmp_path, text)
    from_flags = parse_args(["--train-data", "a.jsonl", "--lr", "1e-4", "--seq-length", "512", "--loss", "dft",
                             "--pack", "--no-fused-loss", "--lr-decay-style", "cosine",
                             "--recompute-granularity", "full", *REQUIRED])
    assert vars(from_yaml) == {**vars(from_flags), "config": str(tmp_path / "run.yaml")}
    assert from_yaml.lr == 1e-4 and from_yaml.train_data == ["a.jsonl"]
    for switch in ("no-fused-loss: true\n", "fused_loss: false\n"):  # named as the flag, or as what it sets
        assert parse(tmp_path, "train-data: a.jsonl\n" + switch).fused_loss is False
    assert parse(tmp_path, "train-data: a.jsonl\nno-fused-loss: false\n").fused_loss is True
    blend = parse(tmp_path, "train-data: [0.3, a.jsonl, 0.7, b.jsonl]\n")
    assert blend.train_data == ["0.3", "a.jsonl", "0.7", "b.jsonl"]
    assert parse(tmp_path, text, "--loss", "ce", "--lr", "2e-5").loss == "ce"  # the command line wins


@pytest.mark.parametrize("line, error", [
    ("lr-decay-style: Linear", "'lr-decay-style': 'Linear' is not one of cosine, linear, constant"),
    ("recompute-granularity: Full", "'recompute-granularity': 'Full' is not one of full, selective"),
    ("loss: CE", "'loss': 'CE' is not one of ce, dft, idft, eaft"),
    ("lr: fast", "'lr': invalid finite value 'fast'"),
    ("lr: .nan", "'lr': invalid finite value nan"),
    ("seq-length: 2.5", "'seq-length': invalid int value 2.5"),
    ("pack: 1", "'pack' must be true or false, got 1"),
    ("lr: [1, 2]", "'lr' must be one value, got [1, 2]"),
    ("learning-rate: 1", "unknown key 'learning-rate'"),
])
def test_bad_config_values_are_one_line_errors(tmp_path, line, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(tmp_path, f"train-data: a.jsonl\n{line}\n")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"pretrain_idft: error: --config {tmp_path / 'run.yaml'}: {error}"


def test_the_command_line_sizes_the_run_over_the_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train-data: a.jsonl\ntrain-iters: 100\n")
    args = parse_args(["--config", str(config), "--epochs", "2", "--deepspeed_config", "x.json"])
    assert (args.epochs, args.train_iters) == (2, None)
    config.write_text("train-data: a.jsonl\nepochs: 2\n")
    args = parse_args(["--config", str(config), "--train-iters", "7", "--deepspeed_config", "x.json"])
    assert (args.epochs, args.train_iters) == (None, 7)


def test_keep_last_needs_somewhere_to_save(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "a.jsonl", "--keep-last", "2", *REQUIRED])
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pretrain_idft: error: --keep-last needs --save"


def build(tmp_path, config, *argv, dp=1, pp=1):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return build_ds_config(parse_args(["--train-data", "a.jsonl", "--deepspeed_config", str(path), "--train-iters", "1",
                                       *argv]), dp, pp)


@pytest.mark.parametrize("config, dp, pp, error", [
    ({"zero_optimization": {"stage": 3}}, 2, 1, "ZeRO stage 3 is not supported (stages 0 to 2;"),
    ({"zero_optimization": {"stage": 2}}, 1, 2, "ZeRO stage 2 does not work with pipeline parallelism"),
    ({"optimizer": {"type": "Adam"}}, 1, 1, "remove the 'optimizer' section"),
    ({"train_micro_batch_size_per_gpu": 4}, 1, 1, "train_micro_batch_size_per_gpu is 4 but --micro-batch-size gives 2"),
    ({}, 3, 1, "global batch size 8 is not divisible by micro-batch size 2 x data-parallel size 3"),
    # 8 / (2 x 1) = 4 steps, not the JSON's 3
    ({"gradient_accumulation_steps": 3}, 1, 1,
     "gradient_accumulation_steps is 3 but --global-batch-size / (micro-batch x DP) gives 4"),
    # no bf16, stage 0, the default clip 1.0, two stages
    ({"zero_optimization": {"stage": 0}}, 1, 2, "fp32 with ZeRO stage 0 clips wrongly under pipeline parallelism"),
])
def test_deepspeed_configs_it_cannot_run_are_errors(tmp_path, config, dp, pp, error):
    with pytest.raises(TrainConfigError, match=re.escape(error)):
        build(tmp_path, config, "--micro-batch-size", "2", "--global-batch-size", "8", dp=dp, pp=pp)


@pytest.mark.parametrize("argv, error", [
    (["--train-iters", "0"], "--train-iters must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--train-iters", "1", "--eval-interval", "5"], "--eval-interval needs --valid-data"),
    # (a comparison with nan is false, so range checks alone let it through)
    (["--train-iters", "1", "--lr", "nan"], "argument --lr: invalid finite value: 'nan'"),
    (["--train-iters", "1", "--lr=-1e-5"], "--lr must be >= 0, got -1e-05"),
    (["--train-iters", "1", "--clip-grad=-1"], "--clip-grad must be >= 0, got -1.0"),
    (["--train-iters", "1", "--exit-duration-in-mins=-1"], "--exit-duration-in-mins must be >= 0, got -1.0"),
    (["--train-iters", "1", "--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1), got 1.5"),
    (["--train-iters", "1", "--idft-warmup-ratio", "2"], "--idft-warmup-ratio must be in [0, 1], got 2.0"),
    (["--train-iters", "1", "--distributed-timeout-minutes", "0"],
     "argument --distributed-timeout-minutes: invalid positive value: '0'"),
    (["--train-iters", "1", "--train-data", "inf", "a.jsonl", "1", "b.jsonl"],
     "--train-data: weight inf of a.jsonl must be a finite number > 0"),
    (["--train-iters", "1", "--export-hf", __file__], f"--export-hf {__file__} is a file; it must be a folder"),
])
def test_flags_it_cannot_run_are_errors(argv, error, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "a.jsonl", "--deepspeed_config", "x.json", *argv])
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"pretrain_idft: error: {error}"


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"lr: 1e-5\n\xff\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config), *REQUIRED])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"pretrain_idft: error: --config {config}: ")


def test_the_built_deepspeed_config(tmp_path):
    # No global batch anywhere: micro x DP = 2 x 3, one micro-batch a step; the clip defaults to 1.0.
    cfg = build(tmp_path, {}, "--micro-batch-size", "2", dp=3)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"], cfg["gradient_clipping"]) == (6, 1, 1.0)
    # --bf16 turns bf16 on where the JSON leaves it open, and refuses a JSON that turns it off.
    for config in ({}, {"bf16": {"enabled": "auto"}}):
        assert build(tmp_path, config, "--micro-batch-size", "2", "--bf16")["bf16"]["enabled"] is True
    assert "bf16" not in build(tmp_path, {}, "--micro-batch-size", "2")
    with pytest.raises(TrainConfigError, match="bf16.enabled is false but --bf16 was given"):
        build(tmp_path, {"bf16": {"enabled": False}}, "--micro-batch-size", "2", "--bf16")
    # fp32 ZeRO-0 under PP is fine without clipping.
    assert build(tmp_path, {}, "--micro-batch-size", "2", "--clip-grad", "0", pp=2)["gradient_clipping"] == 0


STAGE1 = {"zero_optimization": {"stage": 1}}


def run_settings_of(tmp_path, argv=(), config=STAGE1, layout=(1, 1, 2), items=((1.0, 100),)):
    """The settings a checkpoint of this run records (train/loop.py builds them the same way)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = parse_args(["--train-data", "a.jsonl", "--deepspeed_config", str(path), "--micro-batch-size", "2",
                       "--global-batch-size", "8", "--train-iters", "10", "--lr", "0.01", *argv])
    parts = [(w, SimpleNamespace(items=n)) for w, n in items]
    return run_settings(args, "smollm2-135m", layout, build_ds_config(args, layout[2], layout[1]), parts,
                        args.train_iters)


@pytest.mark.parametrize("change, refused", [
    # DeepSpeed restores the optimizer, its schedule and the clipping from the checkpoint:
    ({"argv": ["--lr", "0.02"]}, "lr 0.01 -> 0.02"),
    ({"argv": ["--min-lr", "0.001"]}, "min_lr 0.0 -> 0.001"),
    ({"argv": ["--lr-decay-style", "cosine"]}, "lr_decay_style linear -> cosine"),
    ({"argv": ["--lr-warmup-iters", "2"]}, "lr_warmup_iters 0 -> 2"),
    ({"argv": ["--train-iters", "20"]}, "lr_decay_iters 10 -> 20"),  # the decay runs over all iterations
    ({"argv": ["--weight-decay", "0.1"]}, "weight_decay 0.0 -> 0.1"),
    ({"argv": ["--adam-beta1", "0.8"]}, "adam_beta1 0.9 -> 0.8"),
    ({"argv": ["--adam-beta2", "0.95"]}, "adam_beta2 0.999 -> 0.95"),
    ({"argv": ["--adam-eps", "1e-6"]}, "adam_eps 1e-08 -> 1e-06"),
    ({"argv": ["--clip-grad", "0.5"]}, "gradient_clipping 1.0 -> 0.5"),
    ({"argv": ["--bf16"]}, "bf16 False -> True"),
    ({"config": {**STAGE1, "fp16": {"enabled": True}}}, "fp16 False -> True"),
    ({"config": {"zero_optimization": {"stage": 2}}}, "zero_stage 1 -> 2"),
    # the data order: the global batch, the seed, the items drawn from and how
    ({"argv": ["--global-batch-size", "16"]}, "global_batch_size 8 -> 16"),
    ({"argv": ["--seed", "7"]}, "seed 1234 -> 7"),
    ({"argv": ["--pack"]}, "pack False -> True"),
    ({"argv": ["--seq-length", "1024"]}, "seq_length 2048 -> 1024"),
    ({"items": ((1.0, 99),)}, "data [[1.0, 100]] -> [[1.0, 99]]"),
    ({"items": ((0.5, 100), (0.5, 30))}, "data [[1.0, 100]] -> [[0.5, 100], [0.5, 30]]"),
    # the layout DeepSpeed's files are cut for
    ({"layout": (2, 1, 1)}, "tensor_model_parallel_size 1 -> 2"),
    ({"layout": (1, 2, 1)}, "pipeline_model_parallel_size 1 -> 2"),
])
def test_a_resumed_run_must_keep_the_settings_its_checkpoint_would_override(tmp_path, change, refused):
    saved = {"iteration": 3, **run_settings_of(tmp_path)}
    with pytest.raises(TrainConfigError, match=re.escape(f"--load ck/iter_0000003 cannot continue exactly with "
                                                         f"this run's settings: {refused}") + "$"):
        check_settings(saved, run_settings_of(tmp_path, **change), "--load ck/iter_0000003")


def test_a_resumed_run_may_change_its_data_parallel_size_and_what_the_checkpoint_does_not_restore(tmp_path):
    """Elastic restarts change DP; the loss, its parameters and the intervals apply as given."""
    saved = {"iteration": 3, **run_settings_of(tmp_path)}
    for layout in ((1, 1, 1), (1, 1, 4)):
        check_settings(saved, run_settings_of(tmp_path, layout=layout), "x")
    check_settings(saved, run_settings_of(tmp_path, ["--loss", "ce", "--idft-beta", "2", "--save", "ck",
                                                     "--save-interval", "5", "--micro-batch-size", "4",
                                                     "--lr-decay-iters", "10", "--train-iters", "30"]), "x")

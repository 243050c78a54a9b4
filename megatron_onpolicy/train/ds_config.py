"""The DeepSpeed config of a run: the JSON file, with the batch sizes, clipping and precision of the
command line filled in. A value the JSON already holds must agree with the command line: two
sources that silently disagree are how runs train something other than what was asked for."""
import json
from pathlib import Path

from ..data.rows import one_line
from .args import TrainConfigError


def build_ds_config(args, dp: int, pp: int) -> dict:
    path = Path(args.deepspeed_config)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainConfigError(f"--deepspeed_config {path}: {one_line(e)}") from None
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise TrainConfigError(f"{path}: remove the '{section}' section; the optimizer and its "
                                   "schedule come from --lr, --min-lr, --lr-decay-style, --weight-decay, ...")

    micro = _pick(cfg, path, "train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size")
    if micro is None:
        raise TrainConfigError(f"no micro-batch size: pass --micro-batch-size or set "
                               f"train_micro_batch_size_per_gpu in {path}")
    glob = _pick(cfg, path, "train_batch_size", args.global_batch_size, "--global-batch-size") or micro * dp
    if glob % (micro * dp):
        raise TrainConfigError(f"global batch size {glob} is not divisible by micro-batch size {micro} "
                               f"x data-parallel size {dp}")
    gas = glob // (micro * dp)
    _pick(cfg, path, "gradient_accumulation_steps", gas, "--global-batch-size / (micro-batch x DP)")
    clip = _pick(cfg, path, "gradient_clipping", args.clip_grad, "--clip-grad")
    cfg.update(train_micro_batch_size_per_gpu=micro, train_batch_size=glob, gradient_accumulation_steps=gas,
               gradient_clipping=1.0 if clip is None else clip)
    if args.bf16:
        if cfg.get("bf16", {}).get("enabled") is False:
            raise TrainConfigError(f"{path}: bf16.enabled is false but --bf16 was given")
        cfg.setdefault("bf16", {})["enabled"] = True

    # Activations change shape with every micro-batch's longest sample; DeepSpeed's partitioning
    # of them over the TP group caches the first shape, so it stays off.
    pipeline = cfg.setdefault("pipeline", {})
    for key in ("pipe_partitioned", "grad_partitioned"):
        if pipeline.get(key):
            raise TrainConfigError(f"{path}: pipeline.{key} must be false (activations have varying shapes)")
        pipeline[key] = False

    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        # Stage 3 gathers a parameter for its own module's forward; the tied head and the fused
        # loss read the embedding's weight outside it, where it is only this rank's partition.
        raise TrainConfigError(f"{path}: ZeRO stage {stage} is not supported (stages 0 to 2; shard the model "
                               "with --tensor-model-parallel-size and --pipeline-model-parallel-size)")
    if pp > 1 and stage > 1:
        raise TrainConfigError(f"{path}: ZeRO stage {stage} does not work with pipeline parallelism "
                               "(DeepSpeed allows stage 0 or 1 with PP > 1)")
    precise = cfg.get("bf16", {}).get("enabled") or cfg.get("fp16", {}).get("enabled")
    if pp > 1 and stage == 0 and not precise and cfg["gradient_clipping"] > 0:
        # DeepSpeed's plain fp32 clipping counts replicated parameters on the first stage only,
        # so the norm (and the clipped step) would depend on P; its ZeRO-1 path counts correctly.
        raise TrainConfigError(f"{path}: fp32 with ZeRO stage 0 clips wrongly under pipeline "
                               "parallelism; use ZeRO stage 1 (ds_configs/zero1_fp32.json)")
    return cfg


def _pick(cfg: dict, path: Path, key: str, flag_value, flag: str):
    """The command-line value if given (checked against the JSON), else the JSON's, else None."""
    have = cfg.get(key, "auto")
    if flag_value is None:
        return None if have == "auto" else have
    if have != "auto" and have != flag_value:
        raise TrainConfigError(f"{path}: {key} is {have} but {flag} gives {flag_value}")
    return flag_value

"""The command line of `launch/pretrain_idft.py`: Megatron / DeepSpeed argument names, optionally
taken from a YAML file of the same keys (`--config`; the command line wins)."""
import argparse
from pathlib import Path

import yaml

from .. import cli
from ..data import DataError
from ..data.rows import one_line
from ..data.blend import parse_blend
from ..ddt import LOSS_KINDS, IDFTConfig
from ..model.attention import BACKENDS
from .recompute import RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS, check_recompute_args


class TrainConfigError(ValueError):
    """Batch sizes, schedule, DeepSpeed config or checkpoint settings that cannot work together
    (a user error: the entry points hand it to cli.run, which reports it as one line)."""
    every_rank = True  # from the flags and the checkpoint's settings, alike on every rank


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain_idft",
                                description="Train with ce / dft / idft / eaft under TP x PP x DP.")
    p.add_argument("--config", help="YAML file of the same keys as the flags (dashes or underscores)")
    cli.add_model_args(p)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)

    g = p.add_argument_group("data")
    g.add_argument("--train-data", nargs="+", metavar="[WEIGHT] PATH",
                   help="an indexed dataset PREFIX (tools/preprocess_data.py), or JSONL, Parquet or a datasets "
                        "folder (preprocessed into the cache once); a blend: W1 PATH1 W2 PATH2 ... (required)")
    g.add_argument("--valid-data", help="as --train-data, one PATH")
    g.add_argument("--prompt-key", default="prompt")
    g.add_argument("--response-key", default="response")
    g.add_argument("--seq-length", type=int, default=2048)
    g.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                   help="rows longer than --seq-length: cut from the response end, or left out")
    g.add_argument("--pack", action="store_true", help="pack samples into rows of --seq-length")
    g.add_argument("--attention-backend", choices=BACKENDS, default="sdpa",
                   help="packed rows and sliding windows on CUDA: sdpa, causal SDPA calls per span; flex, one "
                        "compiled flex_attention call on a block mask (needs Triton and a C compiler)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("batches and schedule")
    g.add_argument("--micro-batch-size", type=int, help="default: the DeepSpeed config's")
    g.add_argument("--global-batch-size", type=int, help="default: the DeepSpeed config's, else micro x DP")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--epochs", type=int, help="instead of --train-iters")
    g.add_argument("--exit-interval", type=int,
                   help="stop (after saving, with --save) once the iteration is a multiple of this")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM / SIGUSR1: save at the end of the iteration and exit with status 75 (requeue)")
    g.add_argument("--exit-duration-in-mins", type=cli.finite,
                   help="save and exit with status 75 (requeue) once this much time has passed since start-up")
    g.add_argument("--lr", type=cli.finite, default=1e-5)
    g.add_argument("--min-lr", type=cli.finite, default=0.0)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: all iterations")
    g.add_argument("--weight-decay", type=cli.finite, default=0.0)
    g.add_argument("--adam-beta1", type=cli.finite, default=0.9)
    g.add_argument("--adam-beta2", type=cli.finite, default=0.999)
    g.add_argument("--adam-eps", type=cli.finite, default=1e-8)
    g.add_argument("--clip-grad", type=cli.finite, help="default: the DeepSpeed config's gradient_clipping, else 1.0")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSS_KINDS, default="idft")
    d = IDFTConfig()
    g.add_argument("--idft-beta", type=cli.finite, default=d.beta)
    g.add_argument("--idft-gamma-min", type=cli.finite, default=d.gamma_min)
    g.add_argument("--idft-gamma-max", type=cli.finite, default=d.gamma_max)
    g.add_argument("--idft-warmup-ratio", type=cli.finite, default=d.warmup_ratio)
    g.add_argument("--idft-transition-ratio", type=cli.finite, default=d.transition_ratio)
    cli.add_fused_loss_args(g, "build the head's logits and run the loss on them (default: the fused chunked "
                               "head + loss)", "loss")

    g = p.add_argument_group("activation recomputation (Megatron's flags; train/recompute.py)")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITIES,
                   help="full: keep only the input of whole decoder layers and recompute them in the backward; "
                        "selective: recompute each layer's attention sub-block only")
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHODS,
                   help="full: uniform (each stage's layers in groups of --recompute-num-layers, all recomputed) "
                        "or block (the first --recompute-num-layers layers of each stage); default uniform")
    g.add_argument("--recompute-num-layers", type=int, help="see --recompute-method (default 1)")

    g = p.add_argument_group("outputs")
    g.add_argument("--save", help="checkpoint folder (also holds metrics.jsonl)")
    g.add_argument("--load", help="resume from the latest checkpoint in this folder; --save wins once it holds a "
                   "complete checkpoint (a requeued job continues its own run)")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--eval-interval", type=int, help="validate every N iterations (and at the end)")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--export-hf", help="write a Hugging Face folder of the final model here")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=False,
                   help="DeepSpeed JSON (ds_configs/); batch sizes and clipping are filled in from the flags")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    from_yaml = _yaml_defaults(p, first.config) if first.config else {}
    p.set_defaults(**from_yaml)
    args = p.parse_args(argv)
    # The run's length one way in --config and the other on the command line: the command line wins.
    if args.train_iters is not None and args.epochs is not None:
        for dest, other in (("train_iters", "epochs"), ("epochs", "train_iters")):
            if dest in from_yaml and other not in from_yaml:
                setattr(args, dest, None)
    for flag, dest in (("--train-data", "train_data"), ("--deepspeed_config", "deepspeed_config")):
        if getattr(args, dest) is None:
            p.error(f"{flag} is required (on the command line or in --config)")
    if (args.train_iters is None) == (args.epochs is None):
        p.error("give exactly one of --train-iters and --epochs")
    try:
        blend = parse_blend(args.train_data, "--train-data")
    except DataError as e:
        p.error(str(e))
    if len(blend) > 1 and args.epochs:
        p.error("--epochs needs one --train-data PATH; a blend is sized by --train-iters")
    for dest in ("train_iters", "epochs", "seq_length", "micro_batch_size", "global_batch_size",
                 "save_interval", "eval_interval", "exit_interval", "keep_last", "recompute_num_layers"):
        value = getattr(args, dest)
        if value is not None and value < 1:
            p.error(f"--{dest.replace('_', '-')} must be >= 1, got {value}")
    for dest in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad", "exit_duration_in_mins"):
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            p.error(f"--{dest.replace('_', '-')} must be >= 0, got {getattr(args, dest)}")
    for dest in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, dest) < 1:
            p.error(f"--{dest.replace('_', '-')} must be in [0, 1), got {getattr(args, dest)}")
    for dest in ("idft_warmup_ratio", "idft_transition_ratio"):  # fractions of the run
        if not 0 <= getattr(args, dest) <= 1:
            p.error(f"--{dest.replace('_', '-')} must be in [0, 1], got {getattr(args, dest)}")
    if args.idft_beta <= 0:
        p.error(f"--idft-beta must be > 0, got {args.idft_beta}")
    if args.idft_gamma_min > args.idft_gamma_max:
        p.error(f"--idft-gamma-min {args.idft_gamma_min} exceeds --idft-gamma-max {args.idft_gamma_max}")
    for flag in ("save_interval", "keep_last", "exit_signal_handler", "exit_duration_in_mins"):
        if getattr(args, flag) not in (None, False) and not args.save:
            p.error(f"--{flag.replace('_', '-')} needs --save")
    if args.eval_interval and not args.valid_data:
        p.error("--eval-interval needs --valid-data")
    for flag in ("save", "export_hf", "tensorboard_dir"):
        cli.check_out(p, f"--{flag.replace('_', '-')}", getattr(args, flag), folder=True)
    cli.check_fused_loss_args(p, args)
    check_recompute_args(p, args)
    return args


def _yaml_defaults(p: argparse.ArgumentParser, path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        p.error(f"--config {path}: {one_line(e)}")
    if not isinstance(data, dict):
        p.error(f"--config {path}: expected a mapping of flag names to values")
    actions = {a.dest: a for a in p._actions}
    # A switch named as on the command line (no-fused-loss: true) means the flag is given; named by
    # what it sets (fused-loss: false), the value is that setting.
    switches = {o.lstrip("-").replace("-", "_"): a for a in p._actions if a.nargs == 0 for o in a.option_strings
                if o.lstrip("-").replace("-", "_") != a.dest}
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        where = f"--config {path}: '{key}'"
        if name in switches:
            given = _yaml_value(p, where, switches[name], value)
            out[switches[name].dest] = switches[name].const if given else switches[name].default
        elif name in actions and name != "config":
            out[name] = _yaml_value(p, where, actions[name], value)
        else:
            p.error(f"--config {path}: unknown key '{key}'")
    return out


def _yaml_value(p, where: str, action, value):
    """A YAML value parsed as the command line parses the flag's text (argparse checks neither
    the type nor the choices of a default)."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            p.error(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, dict) or (isinstance(value, list) and action.nargs != "+"):
        p.error(f"{where} must be one value, got {value!r}")
    parsed = []
    for item in value if isinstance(value, list) else [value]:
        try:
            item = (action.type or str)(str(item))
        except (TypeError, ValueError):
            p.error(f"{where}: invalid {action.type.__name__} value {item!r}")
        if action.choices is not None and item not in action.choices:
            p.error(f"{where}: {item!r} is not one of {', '.join(map(str, action.choices))}")
        parsed.append(item)
    return parsed if action.nargs == "+" else parsed[0]


def idft_config(args) -> IDFTConfig:
    return IDFTConfig(args.idft_beta, args.idft_gamma_min, args.idft_gamma_max,
                      args.idft_warmup_ratio, args.idft_transition_ratio)

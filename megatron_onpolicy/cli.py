"""What the command-line tools share: the model / layout / data arguments, start-up, and turning
user errors into one clear line and a non-zero exit."""
import argparse
import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .data import DataError
from .ddt import fused
from .generate.templates import TemplateError
from .model.config import ModelConfigError
from .model.hub import ModelPathError
from .parallel import state
from .parallel.state import ParallelLayoutError

USER_ERRORS = (DataError, ModelPathError, ModelConfigError, ParallelLayoutError, TemplateError, FileNotFoundError)


def finite(text: str) -> float:
    """A float flag's type: nan and inf are refused here, where range checks would let nan through
    (every comparison with it is false). argparse (and --config) name the flag: 'invalid finite value'."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def positive(text: str) -> float:
    """A finite float flag's type that must be > 0: 'invalid positive value'."""
    value = finite(text)
    if value <= 0:
        raise ValueError(text)
    return value


def check_out(p: argparse.ArgumentParser, flag: str, path, folder: bool) -> None:
    """An output path that is the other kind of thing (a file for a folder, or the reverse) is a
    flag error at start, not a failed rename after all the work (or a file replaced by a folder)."""
    if path is not None and Path(path).exists() and Path(path).is_dir() != folder:
        p.error(f"{flag} {path} is a {'file' if folder else 'folder'}; it must be a {'folder' if folder else 'file'}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="HF checkpoint folder, .gguf file, or the alias smollm2-135m (embedded)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="run the model in bf16 (statistics stay fp32)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    add_timeout_arg(p)


def add_timeout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed-timeout-minutes", type=positive, default=10,
                   help="how long a rank waits in a collective for the others (default 10, as Megatron's); "
                        "more than the longest wait: saving a checkpoint, writing the HF export, a batch of rows")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each batch's decode steps from one CUDA graph (CUDA devices only; "
                        "docs/performance.md)")


def check_decoding_args(p: argparse.ArgumentParser, args) -> None:
    """The generating tools' flags, checked before any model loads."""
    if args.cuda_graph and not torch.cuda.is_available():
        p.error("--cuda-graph needs a CUDA device, and none is visible")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    for dest in ("max_new_tokens", "batch_size"):
        if getattr(args, dest) < 1:
            p.error(f"--{dest.replace('_', '-')} must be >= 1, got {getattr(args, dest)}")


def add_fused_loss_args(p, off_help: str, chunk_of: str) -> None:
    p.add_argument("--no-fused-loss", dest="fused_loss", action="store_false", help=off_help)
    p.add_argument("--loss-chunk-size", type=int, help=f"tokens per chunk of the fused {chunk_of} (default: by memory)")
    p.add_argument("--fused-loss-kernel", choices=fused.KERNELS,
                   help="a chunk's softmax sums: compiled (the default; one torch.compile'd kernel, which needs a "
                        "C++ compiler on the CPU and Triton on CUDA) or eager torch ops")


def check_fused_loss_args(p, args) -> None:
    """The chunk size and kernel set the fused path only: given with --no-fused-loss they would be
    ignored, so they are an error."""
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        p.error(f"--loss-chunk-size must be >= 1, got {args.loss_chunk_size}")
    if not args.fused_loss:
        for dest in ("loss_chunk_size", "fused_loss_kernel"):
            if getattr(args, dest) is not None:
                p.error(f"--{dest.replace('_', '-')} sets the fused loss, which --no-fused-loss turns off")
    args.fused_loss_kernel = args.fused_loss_kernel or "compiled"


# Flags that set how a tool runs, not what an output row holds: a restarted run may change them.
RUN_ONLY = ("out", "out_dir", "window", "batch_size", "micro_batch_size", "tensor_model_parallel_size",
            "distributed_timeout_minutes", "local_rank", "cuda_graph", "fused_loss", "loss_chunk_size",
            "fused_loss_kernel")


def row_settings(args, *run_only: str) -> dict:
    """The flags a tool's output rows depend on (outputs.open_shards keeps them beside the shards);
    run_only: the tool's own flags that do not."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY + run_only}


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL, Parquet or a datasets folder")
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--response-key", default="response")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start(tp: int, pp: int = 1, num_heads=None, num_kv_heads=None, timeout_minutes: float = 10) -> None:
    """Join the job and build the process groups, after checking the layout is possible."""
    state.init_distributed(timeout_minutes)
    state.check_layout(dist.get_world_size(), tp, pp, num_heads, num_kv_heads)
    state.initialize_model_parallel(tp, pp)


def first_error(message):
    """Agree across all ranks on the first error any rank found (None if none did)."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, message)
    return next((m for m in found if m), None)


def on_every_rank(open_):
    """open_() on every rank, for what each rank reads itself (a tool's input): a DataError on any
    rank (a path mistyped, a file some node lacks) is raised on every rank alike, so it is one line
    (naming the host that had it) rather than one a rank."""
    try:
        result, error = open_(), None
    except DataError as e:
        result, error = None, f"{e} (on {socket.gethostname()})"
    error = first_error(error)
    if error:
        raise DataError(error, every_rank=True)
    return result


def decided_by_rank_0(decide):
    """decide() on rank 0 alone, and its result on every rank (its error raised on every rank
    alike): for choices made from files that ranks on other nodes could see otherwise (a file
    system's caches), or that send some ranks into collectives the others would skip."""
    decided = [None]
    if dist.get_rank() == 0:
        try:
            decided = [decide()]
        except Exception as e:  # the others would wait for the decision
            decided = [e]
    dist.broadcast_object_list(decided, src=0)
    if isinstance(decided[0], Exception):
        decided[0].every_rank = True  # (run)
        raise decided[0]
    return decided[0]


def run(main, prog: str, user_errors: tuple = ()) -> None:
    """Run `main()`; a user error (USER_ERRORS, plus the tool's own `user_errors`) becomes
    `prog: error: ...` on stderr and exit code 2: once, from rank 0, where every rank raises it
    alike (an error's `every_rank`); else from each rank that has it, named."""
    try:
        main()
    except USER_ERRORS + user_errors as e:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        elif not getattr(e, "every_rank", False):
            # Perhaps this rank's alone (a file its node lacks): rank 0 may be waiting in a
            # collective, and the launcher stops it without a word.
            print(f"{prog}: error on rank {rank} ({socket.gethostname()}): {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # skip teardown: the other ranks may be blocked in a collective

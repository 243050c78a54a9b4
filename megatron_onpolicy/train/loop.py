"""The training run: set up, then per iteration: this rank's micro-batches and the global token
count, one DeepSpeed step, metrics; validation, checkpoints and the HF export at their intervals."""
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import cli, preempt
from ..ddt import fused, idft_lambda
from ..model import attention
from ..model.hf_io import load_hf_weights
from ..model.loader import load_arch, load_tokenizer
from ..parallel import state
from ..parallel.random import seed_model_parallel
from . import checkpoint
from .args import idft_config
from .batches import TrainBatches, ValidBatches, load_parts
from .ds_config import build_ds_config
from .engine import forward_only, make_engine, pipeline_module, train_step
from .export import export_hf
from .loss import TrainLoss
from .metrics import MetricsLog, cat, global_sums, is_last_stage, token_summary, writer_rank
from .model import build_pipeline, hf_names
from .optim import make_optimizer, make_scheduler
from .recompute import Recompute


def train(args) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    folder, arch = load_arch(args.model)
    cli.start(tp, pp, arch.num_heads, arch.num_kv_heads, args.distributed_timeout_minutes)
    dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    ds_config = build_ds_config(args, dp, pp)
    load, tag = checkpoint.resume_point(args.save, args.load)  # a missing checkpoint fails now, before any work
    if load and args.load and Path(load).resolve() != Path(args.load).resolve() and dist.get_rank() == 0:
        print(f"resuming from --save {args.save}, which holds this run's newest checkpoint, "
              f"not --load {args.load}", flush=True)
    args.load = load
    stopper = preempt.Stop(preempt.SIGNALS if args.exit_signal_handler else (), args.exit_duration_in_mins) \
        if args.exit_signal_handler or args.exit_duration_in_mins is not None else None
    seed_model_parallel(args.seed)

    # Data: memory-mapped indexed datasets (see batches.py); errors are the same on every rank.
    tokenizer = load_tokenizer(folder)
    train_data = load_parts(args.train_data, "--train-data", tokenizer, folder, args, args.pack)
    valid_data = load_parts([args.valid_data], "--valid-data", tokenizer, folder, args, False)[0][1] \
        if args.valid_data else None
    gas = ds_config["gradient_accumulation_steps"]
    reads = state.get_pipeline_model_parallel_rank() in (0, pp - 1)  # the stages DeepSpeed loads batches on
    batches = TrainBatches(train_data, args, dp, dp_rank, state.get_data_parallel_group(), gas,
                           ds_config["train_batch_size"], reads)
    total = batches.total_iters()
    writer = dist.get_rank() == writer_rank()
    if writer:
        for weight, part in train_data:
            print(part.describe() + (f", weight {weight:.4g}" if len(train_data) > 1 else ""), flush=True)
        if valid_data:
            print(valid_data.describe(), flush=True)

    # Model and engine.
    attention.set_backend(args.attention_backend)
    fused.set_kernels(args.fused_loss_kernel)
    loss_fn = TrainLoss(args.loss, idft_config(args), state.get_tensor_model_parallel_group(), arch.vocab_size,
                        keep_tokens=writer and bool(args.tensorboard_dir), chunk_size=args.loss_chunk_size)
    pipe = build_pipeline(arch, state.get_tensor_model_parallel_group(), state.topology(), loss_fn, args.fused_loss,
                          Recompute.from_args(args))
    if not args.load:  # a resumed run takes every weight from its checkpoint
        load_hf_weights(pipe, folder, hf_names(pipe))
    optimizer = make_optimizer(pipe, args)
    engine = make_engine(pipe, ds_config, optimizer, make_scheduler(optimizer, args, total))
    meta = checkpoint.run_settings(args, model_name(args.model), (tp, pp, dp), ds_config, train_data, total)
    start, position = checkpoint.load(engine, args.load, tag, meta) if args.load else (0, batches.start())
    if start >= total and dist.get_rank() == 0:
        print(f"nothing to train: {args.load} is at iteration {start} of --train-iters {total}", flush=True)

    log = None
    if writer:
        log = MetricsLog(metrics_folder(args), args.tensorboard_dir, total, start)
    valid = ValidBatches(valid_data, ds_config["train_micro_batch_size_per_gpu"], dp, dp_rank, reads) \
        if valid_data else None
    gpu = torch.cuda.is_available()
    done = start
    for iteration in range(start + 1, total + 1):
        micro, counts, position = batches.next(position)
        loss_fn.reset()
        if counts:  # (a middle pipeline stage reads nothing and computes no loss)
            loss_fn.denom = counts["loss_tokens"] / (gas * dp)
        loss_fn.lam = idft_lambda((iteration - 1) / total, args.idft_warmup_ratio, args.idft_transition_ratio)
        lr = engine.get_lr()[0]
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train_step(engine, micro)
        if gpu:  # kernels run behind the host: the iteration ends when the device is done
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        record, phi, gamma = None, cat(loss_fn.phi), cat(loss_fn.gamma)  # before validation resets them
        if is_last_stage():
            grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed computes none (fp32 ZeRO-0)
            record = {"iteration": iteration, **token_summary(global_sums(loss_fn), args.loss), "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm), "lam": loss_fn.lam,
                      **counts, "tokens_per_s": counts["tokens"] / seconds,
                      # the data position: samples (packed rows with --pack) of the epoch consumed
                      **batches.where(position),
                      **({"mem_peak_gb": torch.cuda.max_memory_allocated() / 1e9} if gpu else {})}
        if valid and (iteration == total or _due(iteration, args.eval_interval)):
            evaluated = validate(engine, loss_fn, valid)
            if record is not None:
                record.update(evaluated)
        if writer:
            log.log(record, phi, gamma)
        stop = _due(iteration, args.exit_interval)
        why = stopper.agreed(cli.device()) if stopper else None  # one tiny all-reduce, on every rank
        if args.save and (iteration == total or stop or why or _due(iteration, args.save_interval)):
            checkpoint.save(engine, args.save, iteration, position, meta, args.keep_last)
        if why and iteration < total:  # (at the last iteration the run is done: it exports and ends)
            if writer:
                log.close()
            preempt.exit_for_requeue("pretrain_idft", why, f"saved {args.save}/{checkpoint.tag_of(iteration)}")
        done = iteration
        if stop:
            break
    if writer:
        log.close()
    if args.export_hf and done >= total:  # the final model, not one an --exit-interval left unfinished
        export_hf(pipeline_module(engine), tokenizer, Path(args.export_hf))
    if dist.get_rank() == 0:
        print(where_it_went(args), flush=True)


def metrics_folder(args) -> Path:
    return Path(args.save or args.tensorboard_dir or os.getcwd())


def where_it_went(args) -> str:
    lines = [f"metrics:      {metrics_folder(args) / 'metrics.jsonl'}"]
    if args.tensorboard_dir:
        lines.append(f"tensorboard:  {args.tensorboard_dir}")
    if args.save and checkpoint.has_complete(args.save):  # (none where nothing was left to train)
        lines.append(f"checkpoints:  {args.save} (latest: {(Path(args.save) / 'latest').read_text()})")
    if args.export_hf:
        lines.append(f"hf model:     {args.export_hf} (transformers.AutoModelForCausalLM.from_pretrained)")
    return "\n".join(lines)


def _due(iteration: int, interval) -> bool:
    return bool(interval) and iteration % interval == 0


def validate(engine, loss_fn, micro_batches) -> dict:
    """Cross-entropy and mean phi over every validation loss token (the last stage's ranks
    return them; the others an empty dict)."""
    loss_fn.reset()
    loss_fn.evaluating = True
    try:
        forward_only(engine, micro_batches)
    finally:
        loss_fn.evaluating = False
    if not is_last_stage():
        return {}
    s = global_sums(loss_fn)
    n = max(s["tokens"], 1.0)
    return {"valid_loss": s["loss_ce"] / n, "valid_phi_mean": s["phi"] / n, "valid_tokens": s["tokens"]}


def model_name(name: str) -> str:
    """What a checkpoint records as its model: an alias as is, a path made absolute (so that
    tools/export_hf.py finds it from any folder)."""
    return str(Path(name).resolve()) if Path(name).exists() else name

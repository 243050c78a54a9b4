"""Checkpoints: DeepSpeed's own files in DIR/iter_NNNNNNN, plus what DeepSpeed does not know.

- client_state: the iteration, the data position and the RNG states, so a resumed run repeats
  the uninterrupted one exactly;
- complete.json in the tag folder: the run's layout and model (tools/export_hf.py reads it).

A checkpoint continues at another data-parallel size (same T and P; the global batch, and so the
data position, does not depend on DP): DeepSpeed loads the weights, and the ZeRO-1/2 optimizer
partitions of the old DP ranks are put together per parameter and cut anew (`_reshard_optimizer`).

A checkpoint is written as DIR/.partial-iter_NNNNNNN and renamed once every rank has finished
(DeepSpeed's file names inside do not depend on the tag), then DIR/latest is replaced
atomically. A crash while saving leaves only a .partial folder, which nothing reads and the next
save removes; the previous checkpoint and `latest` are untouched. Every file is on disk, not only
in a node's cache, before `latest` names it: the save goes on to prune the checkpoint before it.
"""
import json
import random
import re
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from .. import cli
from ..outputs import fsync_file, replace_dir, write_json_atomic, write_text_atomic
from .args import TrainConfigError
from .batches import Position

MARKER = "complete.json"
PARTIAL = ".partial-"
_TAG = re.compile(r"(\.partial-)?iter_(\d{7})$")


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(engine, folder, iteration: int, position: Position, meta: dict, keep_last=None) -> None:
    """Every rank calls this. meta: the run's layout and data settings (checked on resume)."""
    folder, tag = Path(folder), tag_of(iteration)
    partial = PARTIAL + tag
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:  # (DeepSpeed's others write their own way)
        engine.checkpoint_engine = _SyncedFiles(engine._config)
    if dist.get_rank() == 0 and (folder / partial).exists():
        shutil.rmtree(folder / partial)
    dist.barrier()
    client = {"iteration": iteration, "data": asdict(position), "rng": _rng_state(), "meta": meta,
              "lr_schedule": engine.lr_scheduler.state_dict()}  # for elastic loads
    engine.save_checkpoint(str(folder), partial, client_state=client, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if dist.get_rank() == 0:
        write_json_atomic(folder / partial / MARKER, {"iteration": iteration, **meta})
        replace_dir(folder / partial, folder / tag)
        write_text_atomic(folder / "latest", tag)
        _prune(folder, keep_last, iteration)
    dist.barrier()


class _SyncedFiles(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine (torch.save), each file synced to disk by the rank that wrote
    it before its save returns."""

    def save(self, state_dict, path):
        super().save(state_dict, path)
        fsync_file(path)


def has_complete(folder) -> bool:
    """Whether `folder` holds a checkpoint `latest` names and that finished saving."""
    latest = Path(folder) / "latest"
    return latest.is_file() and (Path(folder) / latest.read_text().strip() / MARKER).is_file()


def resume_point(save, load) -> tuple:
    """(folder, tag) the run continues from, or (None, None): --save's newest checkpoint once it has
    one (a requeued job continues from its own: were --load to win, every requeue of `--load A
    --save B` would start again from A and redo B's iterations), else --load's. Rank 0 decides and
    every rank loads that one: a node whose file system still showed an older `latest` would
    otherwise load another iteration, or start afresh beside ranks that resume."""
    def decide():
        folder = save if save and has_complete(save) else load
        return (str(folder), read_checkpoint(folder)[0]) if folder else (None, None)

    folder, tag = cli.decided_by_rank_0(decide)
    if folder:
        read_checkpoint(folder, tag)  # every rank sees it complete (a node-local folder may lack it)
    return folder, tag


def read_checkpoint(folder, tag=None) -> tuple[str, dict]:
    """(tag, complete.json contents) of checkpoint `tag` in `folder`, by default the latest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--load {folder}: no such folder")
    if tag is None:
        if not (folder / "latest").is_file():
            raise FileNotFoundError(f"--load {folder}: no checkpoint there (no 'latest' file)")
        tag = (folder / "latest").read_text().strip()
    marker = folder / tag / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"--load {folder}: no complete checkpoint '{tag}' (no {tag}/{MARKER})")
    return tag, json.loads(marker.read_text())


def run_settings(args, model: str, layout: tuple[int, int, int], ds_config: dict, train_data, total: int) -> dict:
    """What a checkpoint records of its run (complete.json) and a resumed run must repeat: the
    layout, and all that sets the data order or that DeepSpeed restores. layout: (T, P, DP)."""
    tp, pp, dp = layout
    return {"model": model, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "data_parallel_size": dp, "global_batch_size": ds_config["train_batch_size"],
            "data": [[w, p.items] for w, p in train_data], "seed": args.seed, "pack": args.pack,
            "seq_length": args.seq_length,
            "bf16": bool(ds_config.get("bf16", {}).get("enabled")),
            "fp16": bool(ds_config.get("fp16", {}).get("enabled")),
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
            # DeepSpeed restores the saved optimizer, schedule and clipping whatever the flags say:
            # a resumed run that changes them would train with a mix of both.
            "gradient_clipping": ds_config["gradient_clipping"], "lr_decay_iters": args.lr_decay_iters or total,
            **{k: getattr(args, k) for k in ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "weight_decay",
                                             "adam_beta1", "adam_beta2", "adam_eps")}}


def check_settings(saved: dict, meta: dict, where: str) -> None:
    """A TrainConfigError naming each setting of `meta` that differs from the checkpoint's (`saved`),
    but the model (an alias or a path, which may move) and the DP size (an elastic restart)."""
    # (a key an older checkpoint lacks is not checked)
    changed = [f"{k} {saved[k]} -> {v}" for k, v in meta.items()
               if k in saved and saved[k] != v and k not in ("model", "data_parallel_size")]
    if changed:
        raise TrainConfigError(f"{where} cannot continue exactly with this run's settings: " + ", ".join(changed))


def load(engine, folder, tag: str, meta: dict) -> tuple[int, Position]:
    """Restore the engine (weights, optimizer, lr schedule), RNG states; -> (iteration, position)."""
    tag, saved = read_checkpoint(folder, tag)
    check_settings(saved, meta, f"--load {folder}/{tag}")
    # Another DP size: ZeRO-1/2 states are re-cut here; ZeRO-0 fp32 holds whole states on every
    # rank (DeepSpeed loads them at any DP), DeepSpeed's bf16 optimizer partitions its own.
    elastic = saved["data_parallel_size"] != meta["data_parallel_size"] and engine.zero_optimization_stage() > 0
    if saved["data_parallel_size"] != meta["data_parallel_size"] and not elastic and engine.bfloat16_enabled():
        change = f"{saved['data_parallel_size']} -> {meta['data_parallel_size']}"
        raise TrainConfigError(f"--load {folder}/{tag}: a bf16 run changes its data-parallel size ({change}) "
                               f"only under ZeRO stage 1 or 2")
    with torch.no_grad():  # DeepSpeed re-broadcasts tied weights in place after loading them
        # DeepSpeed refuses ZeRO states of another DP size: then weights only, and the rest here.
        path, client = engine.load_checkpoint(str(folder), tag, load_module_only=elastic)
        if path is None:
            raise FileNotFoundError(f"--load {folder}: DeepSpeed could not load checkpoint '{tag}'")
        if elastic:
            _reshard_optimizer(engine, folder, tag)
            engine.lr_scheduler.load_state_dict(client["lr_schedule"])
            for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                group["lr"] = lr  # what the saved optimizer's groups held
            engine.global_steps = client["iteration"]
            engine.global_samples = client["iteration"] * meta["global_batch_size"]
    _set_rng_state(client["rng"])
    return client["iteration"], Position(**client["data"])


def _reshard_optimizer(engine, folder, tag) -> None:
    """Restore ZeRO-1/2 fp32 master weights and Adam moments saved at another DP size.

    Each old DP rank's file holds, per parameter group, one contiguous partition of the flattened
    parameters and, per parameter name, where its fragment lies in that partition (DeepSpeed's
    param_slice_mappings, what its universal checkpoints are made from). A parameter's fragments
    in DP rank order make the whole parameter; this rank keeps the fragment its new partition
    holds (the parameter's `_hp_mapping`). Every rank reads the old files of its own model-parallel
    rank, as DeepSpeed's own elastic loading does."""
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)

    # DeepSpeed's own list of the old DP ranks' files of this model-parallel rank (a private helper)
    names = engine._get_all_zero_checkpoint_names(str(folder), tag, engine.bfloat16_enabled())
    # Memory-mapped: only the fragments this rank copies are read, not every old rank's whole
    # partition into each of a node's 8 processes (mmap needs torch.save's zip format, DeepSpeed's
    # default "checkpoint_serialization").
    parts = [torch.load(n, map_location="cpu", mmap=zipfile.is_zipfile(n), weights_only=False)[OPTIMIZER_STATE_DICT]
             for n in names]
    # The loss scaler's state (fp16: its scale; restarting it would skip the first steps as
    # overflows), the overflow flag and clipping: the same in every old rank's file.
    engine.optimizer._load_global_state(parts[0])
    params = dict(engine.module.named_parameters())  # the names DeepSpeed's mappings use
    optimizer = engine.optimizer.optimizer  # torch's AdamW over this rank's flat fp32 partitions
    for g, group in enumerate(optimizer.param_groups):
        flat, = group["params"]
        old = [p[BASE_OPTIMIZER_STATE]["state"][g] for p in parts]
        keys = [k for k, v in old[0].items() if torch.is_tensor(v) and v.dim() == 1]  # exp_avg, exp_avg_sq
        state = optimizer.state[flat]
        for k in keys:
            state.setdefault(k, torch.zeros_like(flat))
        # The same on every rank; the fused AdamW keeps it on the parameters' device, in fp32.
        state["step"] = old[0]["step"].to(flat.device, torch.float32) if group["fused"] else old[0]["step"]
        new = {"fp32": flat.data, **{k: state[k] for k in keys}}
        for name in dict.fromkeys(n for p in parts for n in p[PARAM_SLICE_MAPPINGS][g]):
            mapping = params[name]._hp_mapping
            if mapping is None:  # no fragment of it in this rank's partition
                continue
            pieces = {k: [] for k in new}
            for part, state_of_part in zip(parts, old):
                where = part[PARAM_SLICE_MAPPINGS][g].get(name)
                if where is not None:
                    pieces["fp32"].append(part[SINGLE_PARTITION_OF_FP32_GROUPS][g].narrow(0, where.start, where.numel))
                    for k in keys:
                        pieces[k].append(state_of_part[k].narrow(0, where.start, where.numel))
            hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
            for k, dst in new.items():
                dst.narrow(0, hp.start, hp.numel).copy_(torch.cat(pieces[k]).narrow(0, lp.start, lp.numel))


def _prune(folder: Path, keep_last, saved: int) -> None:
    """Remove leftovers of crashed saves, and checkpoints beyond the newest `keep_last` up to the
    one just saved (iteration `saved`). Those numbered above it are left alone: they are another
    run's, e.g. one whose crash came after its save was renamed into place and before `latest`
    named it, so that this run resumed from an earlier one; counting them, it removed its own."""
    tags = sorted((p for p in folder.iterdir() if p.is_dir() and _TAG.match(p.name)), key=lambda p: p.name[-7:])
    complete = [p for p in tags if not p.name.startswith(PARTIAL) and (p / MARKER).is_file()]
    ours = [p for p in complete if int(p.name[-7:]) <= saved]
    keep = set(complete) - set(ours) | set(ours[-keep_last:] if keep_last else ours)
    for p in tags:
        if p not in keep:
            shutil.rmtree(p)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tp_tracker": get_cuda_rng_tracker().get_states()}  # parallel/random.py, per TP rank
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "tp_tracker" in state:  # (checkpoints written before it was kept)
        get_cuda_rng_tracker().set_states(state["tp_tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

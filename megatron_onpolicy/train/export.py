"""A Hugging Face folder from the parallel model, written where it lies: each pipeline stage of DP
replica 0 merges its TP shards one parameter at a time (model/hf_io.gather_hf_tensors), and its
TP rank 0 writes them, in files of at most MAX_FILE_BYTES, from host memory; rank 0 adds the
index, config and tokenizer. A rank holds one merged parameter on its device and, where it writes,
one file's tensors on the host; nothing but tensor names and sizes travels between stages."""
import gc
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .. import cli
from ..model.hf_io import gather_hf_tensors, hf_shapes, write_hf_extras
from ..model.loader import load_arch, load_tokenizer
from ..outputs import fsync_file, replace_dir
from ..parallel import state
from . import checkpoint
from .engine import make_engine, pipeline_module
from .model import build_pipeline, hf_names

MAX_FILE_BYTES = 4 * 10**9  # "4GB", tools/export_hf.py's default --max-shard-size


def export_hf(pipe, tokenizer, out, max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Every rank calls this with its PipelineModule. The folder is written under a temporary
    name and renamed by rank 0 after a barrier: on several nodes it appears only once every
    stage's files are on the shared file system, each synced to disk by its writer."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    stage, dp0 = state.get_pipeline_model_parallel_rank(), state.get_data_parallel_rank() == 0
    writes = dp0 and state.get_tensor_model_parallel_rank() == 0
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed export's leftovers
        tmp.mkdir(parents=True)
    dist.barrier()
    names = hf_names(pipe)
    shapes = hf_shapes(pipe, names)
    itemsize = next(pipe.parameters()).element_size()
    sizes = {h: math.prod(shape) * itemsize for parts in shapes.values() for h, shape in parts.items()}
    listed = [None] * dist.get_world_size()
    dist.all_gather_object(listed, (stage, sizes) if writes else None)
    stages = sorted((x for x in listed if x is not None), key=lambda x: x[0])  # one writer a stage
    files = plan_files(stages, max_file_bytes)
    n = len(files)
    name_of = lambda k: "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    if dp0:
        mine = [(k, set(group)) for k, (s, group) in enumerate(files) if s == stage]
        wanted = set().union(*(group for _, group in mine))
        held = {}  # the writer's merged tensors of its next file, on the host
        # (skipped: a tied embedding, in the first stage's files; the same on every TP rank)
        for merged in gather_hf_tensors(pipe, names, skip=wanted.isdisjoint):
            if writes:
                held.update((h, t.cpu()) for h, t in merged.items())
                while mine and mine[0][1] <= held.keys():
                    k, group = mine.pop(0)
                    save_file({h: held.pop(h).contiguous() for h in group}, tmp / name_of(k), metadata={"format": "pt"})
                    fsync_file(tmp / name_of(k))  # replace_dir lets go of the old export
            del merged
    dist.barrier()  # every stage's files are on the file system
    if dist.get_rank() == 0:
        sizes = {h: nbytes for _, stage_sizes in stages for h, nbytes in stage_sizes.items()}
        weight_map = {h: name_of(k) for k, (_, group) in enumerate(files) for h in group}
        weights = set(tmp.iterdir())
        write_hf_extras(tmp, pipe.cfg, tokenizer, next(p.dtype for p in pipe.parameters()),
                        weight_map if n > 1 else None, sum(sizes[h] for h in weight_map))
        for f in set(tmp.iterdir()) - weights:
            fsync_file(f)
        replace_dir(tmp, out)
    dist.barrier()


def plan_files(stages: list, max_bytes: int) -> list:
    """[(stage, {HF name: bytes} in its order)] -> [(stage, [HF names of one file])]: each stage's
    tensors, less those an earlier stage has (the tied embedding), in files of at most max_bytes
    (a larger tensor alone in its file), numbered across stages in order."""
    files, seen = [], set()
    for stage, sizes in stages:
        size = 0
        for h, nbytes in sizes.items():
            if h in seen:
                continue
            seen.add(h)
            if not files or files[-1][0] != stage or (size + nbytes > max_bytes and files[-1][1]):
                files.append((stage, []))
                size = 0
            files[-1][1].append(h)
            size += nbytes
    return files


def export_checkpoint(load, tag, out, model=None, max_file_bytes: int = MAX_FILE_BYTES,
                      timeout_minutes: float = 10) -> None:
    """A saved checkpoint -> a Hugging Face folder. Runs on T x P ranks (or a multiple: the
    extra data-parallel replicas idle), the layout the checkpoint was saved with."""
    state.init_distributed(timeout_minutes)
    if tag is None:  # rank 0 reads `latest` for all: a training run may save a newer one meanwhile
        _, tag = checkpoint.resume_point(None, load)
    tag, meta = checkpoint.read_checkpoint(load, tag)
    tp, pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    folder, arch = load_arch(model or meta["model"])
    cli.start(tp, pp, arch.num_heads, arch.num_kv_heads, timeout_minutes)
    pipe = build_pipeline(arch, state.get_tensor_model_parallel_group(), state.topology(), loss_fn=None)
    # An engine without optimizer, only to read DeepSpeed's files for this rank's stage and shard;
    # in the run's precision, so the folder holds the tensors the run trained.
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": meta["bf16"]}, "fp16": {"enabled": meta.get("fp16", False)}}
    engine = make_engine(pipe, config)
    with torch.no_grad():
        path, _ = engine.load_checkpoint(str(load), tag, load_module_only=True, load_optimizer_states=False,
                                         load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{load}/{tag}: DeepSpeed could not load this checkpoint")
    export_hf(pipeline_module(engine), load_tokenizer(folder), out, max_file_bytes)
    # DeepSpeed's engine sits in reference cycles: uncollected, its weights (device memory) would
    # outlive this call beside the model a caller loads next (tools/evaluate.py --load).
    del engine, pipe
    gc.collect()

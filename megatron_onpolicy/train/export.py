"""A Hugging Face folder from the parallel model, written where it lies: each pipeline stage of DP
replica 0 merges its TP shards (model/hf_io.gather_hf_state) and its TP rank 0 writes them as the
stage's own safetensors file; rank 0 adds the index, config and tokenizer. No rank holds more than
its own stage, and nothing but tensor names travels between stages."""
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .. import cli
from ..model.hf_io import gather_hf_state, write_hf_extras
from ..model.hub import replace_dir
from ..model.loader import load_arch, load_tokenizer
from ..parallel import state
from . import checkpoint
from .engine import make_engine, pipeline_module
from .model import build_pipeline, hf_names


def export_hf(pipe, tokenizer, out) -> None:
    """Every rank calls this with its PipelineModule. The folder is written under a temporary
    name and renamed by rank 0 after a barrier: on several nodes it appears only once every
    stage's file is on the shared file system."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.partial"
    pp, stage = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
    filename = f"model-{stage + 1:05d}-of-{pp:05d}.safetensors" if pp > 1 else "model.safetensors"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed export's leftovers
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = gather_hf_state(pipe, hf_names(pipe)) if state.get_data_parallel_rank() == 0 else {}
    writes = state.get_data_parallel_rank() == 0 and state.get_tensor_model_parallel_rank() == 0
    # Names (and sizes) only: a tied embedding sits on the first and the last stage, and the
    # first stage's file holds it.
    listed = [None] * dist.get_world_size()
    dist.all_gather_object(listed, (stage, {k: v.numel() * v.element_size() for k, v in tensors.items()})
                           if writes else None)
    listed = sorted(x for x in listed if x is not None)
    earlier = {k for s, names in listed if s < stage for k in names}
    if writes:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items() if k not in earlier}, tmp / filename,
                  metadata={"format": "pt"})
    del tensors
    dist.barrier()  # every stage's file is on the file system
    if dist.get_rank() == 0:
        weight_map, size = {}, 0
        for s, names in listed:
            for k, nbytes in names.items():
                if k not in weight_map:
                    weight_map[k] = f"model-{s + 1:05d}-of-{pp:05d}.safetensors" if pp > 1 else "model.safetensors"
                    size += nbytes
        write_hf_extras(tmp, pipe.cfg, tokenizer, next(p.dtype for p in pipe.parameters()),
                        weight_map if pp > 1 else None, size)
        replace_dir(tmp, out)
    dist.barrier()


def export_checkpoint(load, tag, out, model=None) -> None:
    """A saved checkpoint -> a Hugging Face folder. Runs on T x P ranks (or a multiple: the
    extra data-parallel replicas idle), the layout the checkpoint was saved with."""
    tag, meta = checkpoint.read_checkpoint(load, tag)
    tp, pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    folder, arch = load_arch(model or meta["model"])
    cli.start(tp, pp, arch.num_heads, arch.num_kv_heads)
    pipe = build_pipeline(arch, state.get_tensor_model_parallel_group(), state.topology(), loss_fn=None)
    # An engine without optimizer, only to read DeepSpeed's files for this rank's stage and shard;
    # in the run's precision, so the folder holds the tensors the run trained.
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "bf16": {"enabled": meta["bf16"]}}
    engine = make_engine(pipe, config)
    with torch.no_grad():
        path, _ = engine.load_checkpoint(str(load), tag, load_module_only=True, load_optimizer_states=False,
                                         load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{load}/{tag}: DeepSpeed could not load this checkpoint")
    export_hf(pipeline_module(engine), load_tokenizer(folder), out)

"""A Hugging Face folder from the parallel model: each stage merges its TP shards
(model/hf_io.gather_hf_state), the stages of DP replica 0 send theirs to rank 0, which writes the
folder (atomically, through model/hf_io.save_hf_folder)."""
import torch
import torch.distributed as dist

from .. import cli
from ..model.hf_io import gather_hf_state, save_hf_folder
from ..model.loader import load_arch, load_tokenizer
from ..parallel import state
from . import checkpoint
from .engine import make_engine, pipeline_module
from .model import build_pipeline, hf_names


def export_hf(pipe, tokenizer, out) -> None:
    """Every rank calls this with its PipelineModule."""
    if state.get_data_parallel_rank() == 0:
        stage = gather_hf_state(pipe, hf_names(pipe))  # a collective over this stage's TP group
        stage = {name: tensor.cpu() for name, tensor in stage.items()}  # pickled to rank 0 below
        if state.get_tensor_model_parallel_rank() == 0:
            stages = [None] * state.get_pipeline_model_parallel_world_size()
            group = state.get_pipeline_model_parallel_group()
            if state.get_pipeline_model_parallel_world_size() > 1:
                dist.gather_object(stage, stages if dist.get_rank() == 0 else None, dst=0, group=group)
            else:
                stages = [stage]
            if dist.get_rank() == 0:
                merged = {}
                for part in stages:  # a tied embedding comes from the first and the last stage: equal
                    for name, tensor in part.items():
                        merged.setdefault(name, tensor)
                save_hf_folder(merged, pipe.cfg, tokenizer, out)
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

"""The DeepSpeed engine around the pipeline model, and one training / validation pass through it.

P > 1: DeepSpeed's PipelineEngine runs the micro-batches through the stages (its mpu is the
pipeline's own grid, built on the same topology as our groups). P == 1: the ordinary engine with
our groups as mpu, stepping once per GAS micro-batches. DeepSpeed owns the optimizer, precision,
accumulation, ZeRO and clipping in both."""
import deepspeed
import torch

from ..parallel import state
from .model import WholeModel


def make_engine(pipe, ds_config: dict, optimizer=None, scheduler=None):
    if pipe.num_pipeline_stages() > 1:
        engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    else:
        engine, *_ = deepspeed.initialize(model=WholeModel(pipe), optimizer=optimizer, lr_scheduler=scheduler,
                                          config=ds_config, mpu=state)
    if (state.get_data_parallel_world_size() == 1 and engine.zero_optimization_stage() == 0
            and not engine.bfloat16_enabled() and not engine.fp16_enabled()):
        # DeepSpeed "all-reduces" fp32 ZeRO-0 gradients over a group of one all the same: it
        # flattens them into one buffer and copies them back, two passes over every gradient a
        # step (7 % of a smollm2-135m step on CPU). There is nothing to reduce. (Mixed precision
        # keeps the path: its optimizers move the gradients to fp32 in it.)
        if is_pipeline(engine):
            engine.pipeline_enable_backward_allreduce = False
        else:
            engine.enable_backward_allreduce = False
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        _keep_clipping_norm(engine)
    return engine


def _keep_clipping_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 clipping computes the global gradient norm and drops it, so the
    metrics had none; this is the same call, with the norm kept where get_global_grad_norm reads."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)
    engine.clip_fp32_gradients = clip_fp32_gradients


def is_pipeline(engine) -> bool:
    return isinstance(engine, deepspeed.PipelineEngine)


def pipeline_module(engine):
    return engine.module if is_pipeline(engine) else engine.module.pipe


def train_step(engine, micro_batches) -> None:
    """One optimizer step over this rank's GAS micro-batches."""
    if is_pipeline(engine):
        engine.train_batch(iter(micro_batches))
        return
    engine.train()
    for inputs, labels in micro_batches:
        loss = engine(_to(inputs, engine.device), _to(labels, engine.device))
        engine.backward(loss)
        engine.step()  # DeepSpeed applies it at the GAS boundary only


@torch.no_grad()
def forward_only(engine, micro_batches) -> None:
    """Run the loss over micro-batches without training (validation); the loss function records."""
    if is_pipeline(engine):
        engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches), reduce_output=None,
                          bcast_loss=False)
        return
    engine.eval()
    for inputs, labels in micro_batches:
        engine(_to(inputs, engine.device), _to(labels, engine.device))


def _to(tensors, device):
    return tuple(t.to(device) for t in tensors)

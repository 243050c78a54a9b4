"""The random states of a TP x PP x DP run, kept as Megatron keeps them, in DeepSpeed's tracker.

Two streams: the default generator, seeded alike on every rank (dropout outside the TP regions,
where the ranks of a TP group hold the same activations), and the tracker's model-parallel
stream, seeded per TP rank (dropout inside a TP region, under
`deepspeed.checkpointing.get_cuda_rng_tracker().fork()`). `deepspeed.checkpointing.checkpoint`
saves both at a recomputed block's forward and restores them for its recomputation, so the
recomputed dropout masks are the ones of the forward. On the CPU accelerator the tracker forks the
CPU generator. (Our Llama has no dropout; the streams are seeded for a model that has.)"""
import deepspeed
import torch

from . import state


def seed_model_parallel(seed: int) -> None:
    """After the process groups exist: seed the default generators, then the tracker."""
    torch.manual_seed(seed)
    # Partitioned (or CPU-offloaded) checkpoints would cache the first micro-batch's shapes;
    # ours change with every micro-batch's longest sample.
    deepspeed.checkpointing.configure(state, partition_activations=False, contiguous_checkpointing=False,
                                      checkpoint_in_cpu=False, synchronize=False, profile=False)
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(seed)

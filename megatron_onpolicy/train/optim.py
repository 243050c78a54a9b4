"""AdamW and its learning-rate schedule, handed to DeepSpeed, which steps both (and clips,
accumulates, shards them under ZeRO, and saves them in checkpoints)."""
import math

import torch


def make_optimizer(module: torch.nn.Module, args) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (the 1-D parameters), as in Megatron.
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
    plain = [p for p in module.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    # fused: one pass over each parameter's weights, gradient and moments (a multi-tensor kernel on
    # CUDA, vectorized on the CPU), where torch's default runs a dozen tensor ops a parameter, each
    # a pass over memory, and its foreach variant holds parameter-sized temporaries.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, fused=True)


def lr_at(step: int, args, total_iters: int) -> float:
    """Learning rate of optimizer step `step` (0-based): a linear warmup over --lr-warmup-iters
    that reaches --lr on its last step (no step is wasted at lr 0), then --lr decayed by cosine or
    linear to --min-lr at --lr-decay-iters (default: all iterations), or kept constant."""
    warmup, decay_iters = args.lr_warmup_iters, args.lr_decay_iters or total_iters
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_decay_style == "constant":
        return args.lr
    if step >= decay_iters:
        return args.min_lr
    ratio = (step - warmup) / max(decay_iters - warmup, 1)
    coeff = 1.0 - ratio if args.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return args.min_lr + coeff * (args.lr - args.min_lr)


def make_scheduler(optimizer, args, total_iters: int):
    # LambdaLR scales the base lr (= --lr); with --lr 0 every factor gives 0.
    def factor(step):
        return lr_at(step, args, total_iters) / args.lr if args.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""The loss function the pipeline calls on its last stage, and what it records for metrics.

The objective of an iteration is the mean over all loss tokens of the global batch. DeepSpeed
divides the gradient by the accumulation steps (GAS) and averages it over the data-parallel
ranks (DP), so each micro-batch's sum is divided by global_tokens / (GAS * DP): after DeepSpeed's
two divisions the gradient is exactly that of the global token mean, whatever T, P, DP and the
micro / global batch split.
"""
import torch

from ..ddt import LOSS_KINDS, IDFTConfig, ddt_loss, fused_ddt_loss, token_weights

# Sums kept per iteration (one all-reduce over DP gives the global values).
SUMS = (*(f"loss_{k}" for k in LOSS_KINDS), "tokens", "phi", "phi_sq", "gamma", "phi_lt_-1")


class TrainLoss:
    def __init__(self, kind: str, idft: IDFTConfig, tp_group, vocab_size: int, keep_tokens: bool = False,
                 chunk_size: int = None):
        self.kind, self.idft, self.tp_group, self.vocab_size = kind, idft, tp_group, vocab_size
        self.chunk_size = chunk_size  # tokens per chunk of the fused loss (None: by memory)
        self.keep_tokens = keep_tokens  # keep each loss token's phi and gamma (TensorBoard histograms)
        self.denom = 1.0     # set per iteration: global loss tokens / (GAS * DP)
        self.lam = 1.0       # set per iteration: the IDFT schedule
        self.evaluating = False
        self.reset()

    def reset(self):
        self.sums = None
        self.phi, self.gamma = [], []  # (values, loss mask) a micro-batch, with keep_tokens: metrics.cat

    def __call__(self, outputs, labels):
        """outputs: the head's vocab-sharded logits, or (hidden, weight shard) for the fused loss."""
        targets, loss_mask = labels
        # Validation reports cross-entropy, the one number comparable across losses and runs.
        kind, denom = ("ce", 1.0) if self.evaluating else (self.kind, self.denom)
        if isinstance(outputs, tuple):
            hidden, weight = outputs
            # Only the loss tokens reach the head: prompts and padding, most of an SFT batch's
            # positions, have zero weight and no recorded statistics. (The count is a host sync,
            # one per micro-batch; the rows' gradient is scattered back by autograd.)
            rows = loss_mask.reshape(-1).nonzero().squeeze(-1)
            hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
            targets, loss_mask = targets.reshape(-1)[rows], loss_mask.reshape(-1)[rows]
            loss, stats, _, gamma = fused_ddt_loss(hidden, weight, targets, loss_mask, kind, denom, self.tp_group,
                                                   self.vocab_size, self.lam, self.idft, self.chunk_size)
        else:
            loss, stats, _, gamma = ddt_loss(outputs, targets, loss_mask, kind, denom, self.tp_group,
                                             self.vocab_size, self.lam, self.idft)
        self._record(stats, gamma, loss_mask)
        return loss

    @torch.no_grad()
    def _record(self, stats, gamma, loss_mask):
        # Masked sums, not boolean indexing: the sums stay on the device without a host sync
        # per micro-batch. The histogram tokens are selected after the step (metrics.cat), whose
        # time they would otherwise count.
        keep = loss_mask > 0

        def total(x):
            return torch.where(keep, x, 0).sum()

        phi = stats.phi
        # Every objective's value on the same tokens: training with one still shows the others.
        per_kind = [total(token_weights(k, stats, self.lam, self.idft, self.vocab_size)[0] * -stats.logp)
                    for k in LOSS_KINDS]
        sums = torch.stack([*per_kind, keep.sum().float(), total(phi), total(phi * phi), total(gamma),
                            (keep & (phi < -1)).sum().float()]).double()
        self.sums = sums if self.sums is None else self.sums + sums
        # Not validation's tokens: the histograms are of training's, and a validation set's would
        # only pile up in device memory until the next iteration.
        if self.keep_tokens and not self.evaluating:
            self.phi.append((phi.float(), keep))
            self.gamma.append((gamma.float(), keep))

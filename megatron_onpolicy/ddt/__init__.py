"""DDT statistics (centered log-likelihood phi, its variance) and the ce / dft / idft / eaft losses,
computed on vocab-parallel logits, or fused with the head matmul chunk by chunk."""
from .fused import fused_ddt_loss, fused_stats
from .losses import LOSS_KINDS, IDFTConfig, ddt_loss, idft_lambda, token_weights
from .stats import TokenStats, vocab_parallel_stats, vocab_shard_range

__all__ = ["LOSS_KINDS", "IDFTConfig", "TokenStats", "ddt_loss", "fused_ddt_loss", "fused_stats", "idft_lambda",
           "token_weights", "vocab_parallel_stats", "vocab_shard_range"]

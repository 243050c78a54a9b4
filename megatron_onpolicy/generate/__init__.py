"""KV-cached batched sampling on the tensor-parallel model, and hinted decoding."""
from .engine import END_REASONS, Generation, SamplingParams, generate
from .hinted import HintConfig, HintedResult, hinted_decode, hinted_generate, lam_schedule
from .sampling import sample
from .stopping import is_repeating, stop_token_ids
from .templates import TemplateError, load_template

__all__ = ["END_REASONS", "Generation", "HintConfig", "HintedResult", "SamplingParams", "TemplateError",
           "generate", "hinted_decode", "hinted_generate", "is_repeating", "lam_schedule", "load_template",
           "sample", "stop_token_ids"]

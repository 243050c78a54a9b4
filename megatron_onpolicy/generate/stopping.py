"""When a row's generation ends: end of sequence, a repetition loop, or a stop string."""
from collections.abc import Iterable

# Slack for tokens that decode to partial characters when a stop string is looked for in the tail.
_TAIL_SLACK = 4


def is_repeating(tokens: list[int], window: int = 30, count: int = 5) -> bool:
    """True when the last window * count tokens repeat with some period p <= window.

    For p = window this is "a window-token block repeated count times at the end"; shorter loops
    (say 7 tokens) are caught over the same span, which the block test alone would miss when p does
    not divide window. Short periods still need window * count tokens, so a run of zeros in a
    number does not trigger it."""
    span = window * count
    if window <= 0 or count <= 1 or len(tokens) < span:
        return False
    tail = tokens[-span:]
    return any(tail[p:] == tail[:-p] for p in range(1, window + 1))


def text_appeared(tokenizer, tokens: list[int], text: str) -> bool:
    """Whether `text` shows up in the decoded tail that the last token completed.

    Called after every appended token, so looking at the tail is enough to see `text` the step it
    appears; decoding only the tail keeps each check O(len(text))."""
    tail = tokens[-(len(text) + _TAIL_SLACK):]
    return text in tokenizer.decode(tail, skip_special_tokens=False)


def end_reason(tokens: list[int], eos_ids: Iterable[int], repeat_window: int, repeat_count: int,
               tokenizer=None, stop_strings: Iterable[str] = ()):
    """"eos", "repeating", "stop-string", or None while the row goes on (max length is the caller's)."""
    if tokens and tokens[-1] in eos_ids:
        return "eos"
    if is_repeating(tokens, repeat_window, repeat_count):
        return "repeating"
    if any(text_appeared(tokenizer, tokens, s) for s in stop_strings):
        return "stop-string"
    return None


def stop_token_ids(tokenizer, folder=None) -> tuple[int, ...]:
    """The tokenizer's EOS plus any EOS ids in the checkpoint's generation_config.json (Llama 3 and
    Qwen chat models end turns with a token other than the tokenizer's EOS)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if folder is not None:
        from transformers import GenerationConfig

        try:
            extra = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:  # no generation_config.json
            extra = None
        ids += [] if extra is None else ([extra] if isinstance(extra, int) else list(extra))
    return tuple(dict.fromkeys(ids))

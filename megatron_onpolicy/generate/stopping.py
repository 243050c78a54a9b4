"""When a row's generation ends: end of sequence, a repetition loop, or a stop string."""
from collections.abc import Iterable

# Slack for tokens that decode to partial characters when a stop string is looked for in the tail.
_TAIL_SLACK = 4


def is_repeating(tokens: list[int], window: int = 30, count: int = 5) -> bool:
    """True when the last `window` tokens occur `count` times in `tokens` (overlaps included).

    Called after every appended token, this stops a row the moment any window-token block first
    occurs `count` times in its output: a new occurrence of a block always ends at the last token,
    so the last window is the only one whose count can have just grown. A loop of any period p
    that fits the output is caught, after window + (count - 1) * p tokens of it: a repeated
    sentence or paragraph as well as a short loop."""
    if window <= 0 or count <= 1 or len(tokens) < window + count - 1:
        return False
    last = tokens[-window:]
    first, seen, i = last[0], 1, 0
    end = len(tokens) - window  # start positions of the earlier windows: [0, end)
    while seen < count:
        try:
            i = tokens.index(first, i, end)  # C-speed scan to the next candidate start
        except ValueError:
            return False
        seen += tokens[i:i + window] == last
        i += 1
    return True


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

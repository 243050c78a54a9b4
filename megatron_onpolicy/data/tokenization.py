"""A row -> token ids and a loss mask (DESIGN.md section 4).

prompt/response rows: the user prompt through the chat template with the generation prompt, then
the response and EOS; the loss is on the response and EOS only.
messages rows: the whole conversation through the chat template; the loss is on the assistant
turns only, found as the difference between the template before and after each assistant turn."""
from collections.abc import Mapping
from dataclasses import dataclass

from .rows import DataError, one_line


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where input_ids[i] is a training target (predicted from position i-1)
    prompt_len: int       # number of leading tokens before the first target
    index: int            # the row's index in the input file (0-based)


def chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    """Token ids of the chat template. transformers 5 returns a BatchEncoding here, 4.x a list."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def tokenize_row(tokenizer, row: dict, source: str, index: int, prompt_key="prompt",
                 response_key="response", messages_key="messages", eos: bool = True) -> Sample:
    """eos=False: a response that was cut (it did not end there) gets no EOS target; in a
    conversation, the last message where it is the assistant's."""
    if prompt_key not in row and response_key not in row:
        if messages_key in row:
            return _tokenize_messages(tokenizer, row[messages_key], source, index, messages_key, eos)
        raise DataError(f"{source}: field '{prompt_key}' missing "
                        f"(a row needs '{prompt_key}' and '{response_key}', or '{messages_key}')")
    prompt = _text(row, prompt_key, source)
    response = _text(row, response_key, source)
    if not response.strip():
        raise DataError(f"{source}: field '{response_key}': empty response")
    prompt_ids = on_row(source, prompt_key, chat_ids, tokenizer, [{"role": "user", "content": prompt}], True)
    response_ids = on_row(source, response_key, lambda: list(tokenizer(response, add_special_tokens=False).input_ids))
    response_ids += [tokenizer.eos_token_id] * eos
    return Sample(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids),
                  len(prompt_ids), index)


def on_row(source: str, field: str, fn, *args):
    """A tokenizer or chat-template call on one row's text: its failure (text the tokenizer cannot
    encode, such as a lone surrogate that JSON allows; a template's own raise_exception) is the
    row's DataError, so the run names the row rather than dying with the library's error."""
    try:
        return fn(*args)
    except Exception as e:  # tokenizers, jinja2 and transformers raise several types here
        raise DataError(f"{source}: field '{field}': the tokenizer or chat template failed "
                        f"({type(e).__name__}: {one_line(e)})") from None


def _text(row: dict, key: str, source: str, prefix: str = "") -> str:
    """row[key], which must be a string; errors name the field as `prefix + key`."""
    if key not in row:
        raise DataError(f"{source}: field '{prefix}{key}' missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: field '{prefix}{key}' must be a string, got {type(value).__name__}")
    return value


def _tokenize_messages(tokenizer, messages, source: str, index: int, key: str, eos: bool = True) -> Sample:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: field '{key}' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{source}: field '{key}[{i}]' must be an object, got {type(m).__name__}")
        _text(m, "role", source, f"{key}[{i}].")
        _text(m, "content", source, f"{key}[{i}].")
    ids = on_row(source, key, chat_ids, tokenizer, messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            raise DataError(f"{source}: field '{key}[{i}].content': empty response")
        if i == 0:
            raise DataError(f"{source}: field '{key}[0]': an assistant turn with no turn before it to answer")
        before = on_row(source, f"{key}[{i}]", chat_ids, tokenizer, messages[:i], True)
        after = on_row(source, f"{key}[{i}]", chat_ids, tokenizer, messages[:i + 1], False)
        # Both must be prefixes of the whole conversation, or the turn's tokens are not where the
        # model sees them in training (a template that rewrites earlier turns, or a merge across
        # the boundary by the tokenizer).
        if after[:len(before)] != before or ids[:len(after)] != after:
            raise DataError(f"{source}: field '{key}[{i}]': the chat template does not extend the "
                            "conversation turn by turn, so the assistant tokens cannot be located")
        turn = after[len(before):]
        # Generation stops at EOS: what the template puts after it (e.g. a newline) is glue, not a
        # target, as for prompt/response rows where the loss ends at EOS. A last message that was
        # cut (eos=False) has no EOS target either.
        if tokenizer.eos_token_id in turn:
            turn = turn[:turn.index(tokenizer.eos_token_id) + (eos or i < len(messages) - 1)]
        mask[len(before):len(before) + len(turn)] = [1] * len(turn)
    if 1 not in mask:
        raise DataError(f"{source}: field '{key}': no assistant turn")
    return Sample(ids, mask, mask.index(1), index)

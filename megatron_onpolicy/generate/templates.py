"""Prompt templates for hinted decoding and the prompt ids of both streams.

A template is plain text with `{question}` and `{answer}` placeholders. They are substituted
literally (not with str.format), so templates may contain other braces, such as `\\boxed{}`."""
import re
from pathlib import Path

from ..data.tokenization import chat_ids

TEMPLATE_DIR = Path(__file__).parent / "templates"
PLACEHOLDERS = ("{question}", "{answer}")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))


class TemplateError(ValueError):
    pass


def load_template(path=None, default_name: str = "hint") -> str:
    """The template at `path`, or the packaged `templates/<default_name>.txt` when path is None."""
    path = Path(path) if path is not None else TEMPLATE_DIR / f"{default_name}.txt"
    if not path.is_file():
        raise TemplateError(f"template file '{path}' " + ("is a folder" if path.is_dir() else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"template file '{path}' is not UTF-8 ({e.reason} at byte {e.start})") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise TemplateError(f"template '{path}' lacks the placeholder(s) {', '.join(missing)}; "
                            f"a hint template needs both {' and '.join(PLACEHOLDERS)}")
    return text


def render(template: str, question: str, answer: str) -> str:
    # One pass, so a question that itself contains "{answer}" is not filled in a second time.
    values = {"{question}": question, "{answer}": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group()], template)


def plain_prompt_ids(tokenizer, question: str) -> list[int]:
    """The plain stream's prompt: exactly how training tokenizes a prompt (DESIGN.md section 4)."""
    return chat_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


def hinted_prompt_ids(tokenizer, template: str, question: str, answer: str) -> list[int]:
    """The hinted stream's prompt: the rendered template as the user turn."""
    return chat_ids(tokenizer, [{"role": "user", "content": render(template, question, answer)}],
                    add_generation_prompt=True)

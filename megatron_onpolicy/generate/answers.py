"""The final answer of a solution: the last \\boxed{...} (braces balanced), else the last number."""
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str):
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed: the text stopped inside the box


def final_answer(text: str):
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer) -> str:
    """Compare answers the way a grader would: no spaces, $, thousands commas or trailing period;
    numbers in one canonical form (12.0 == 12)."""
    s = str(answer).strip().rstrip(".").replace("$", "").replace(" ", "")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", s):
        value = float(s.replace(",", ""))
        return str(int(value)) if value.is_integer() else repr(value)
    return s


def answers_match(text: str, reference) -> bool:
    found = final_answer(text)
    return found is not None and normalize(found) == normalize(reference)

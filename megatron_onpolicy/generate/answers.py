"""The final answer of a solution and how a grader compares it with a reference.

The answer is the last \\boxed{...} (braces balanced, so \\boxed{\\frac{1}{2}} is whole), else the
last number in the text. Answers compare after normalization: no spaces, $, \\text{}, thousands
commas, trailing period or unit; numbers (integers, decimals, a/b, \\frac{a}{b}) by exact value,
so 1,250 == 1250.0 and \\frac{1}{2} == \\frac12 == 0.5 == .5 == 1/2."""
import re
from fractions import Fraction

from ..data.rows import DataError

_NUM = r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"{_NUM}(?:/\d+(?!\.\d))?")
# \frac{a}{b}, and LaTeX's one-digit shorthand \frac12
_FRAC = re.compile(r"(-?)\\[dt]?frac(?:\{([^{}]+)\}|(\d))(?:\{([^{}]+)\}|(\d))")
# A trailing unit: percent or degrees; a word after a space ("5 m", "12 square feet"); or a word of
# two or more letters right after the number ("5cm"). One letter right after it is a variable or an
# exponent ("2x", "1e3"), and stays, so that such answers do not pass for the bare number; so do
# the words that scale a number ("1 million", "6 pi", "10 sqrt2").
_SCALE = r"(?!(?:hundred|thousand|million|billion|trillion|dozen)s?(?![a-z])|pi(?![a-z])|sqrt)"
_WORD = rf"{_SCALE}[a-zA-Z][a-zA-Z./^0-9]*"
_UNIT = re.compile(rf"(?:\\?%|\^\{{?\\circ\}}?|°|\s+{_WORD}|(?<=\d){_SCALE}[a-zA-Z]{{2,}}[a-zA-Z./^0-9]*)"
                   rf"(?:\s+{_WORD})*$")


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


# Longer is compared as text: a degenerate generation's run of digits would otherwise reach Python's
# limit on int <-> str conversion (4300 digits) and stop the tool on that row at every restart.
MAX_NUMBER_CHARS = 1000


def _value(s: str):
    """The exact value of a plain number or fraction (thousands commas allowed), else None."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    m = _FRAC.fullmatch(s)
    if m:
        s = f"{m.group(1)}({m.group(2) or m.group(3)})/({m.group(4) or m.group(5)})"
    m = re.fullmatch(rf"(-?)\(?({_NUM})\)?(?:/\(?({_NUM})\)?)?", s)
    if not m:
        return None
    num = Fraction(m.group(2).replace(",", ""))
    den = Fraction(m.group(3).replace(",", "")) if m.group(3) else Fraction(1)
    if den == 0:
        return None
    return (-1 if m.group(1) else 1) * num / den


def normalize(answer) -> str:
    """A canonical string: numbers as their exact value ("1250", "1/2"), other answers stripped."""
    s = re.sub(r"\\text\{([^{}]*)\}", r" \1 ", str(answer)).replace("{,}", ",")  # 12{,}000: LaTeX's comma
    s = re.sub(r"\\[,!; ]|\\?\$", "", s).strip().rstrip(".").strip()
    for candidate in (s, _UNIT.sub("", s)):  # "12 dollars", "50\%", "90^\circ" -> the number
        value = _value(re.sub(r"\s", "", candidate))
        if value is not None:
            return str(value)
    return re.sub(r"\s", "", s)


def reference_answer(row, key: str):
    """A row's reference answer: a string or a number. Anything else (null, a list, true) would be
    graded as its Python text ('None'), so it is a DataError naming the row and field."""
    answer = row.data[key]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{row.source}: field '{key}' must be a string or a number, got {answer!r}")
    return answer


def answers_match(text: str, reference) -> bool:
    found = final_answer(text)
    return found is not None and normalize(found) == normalize(reference)

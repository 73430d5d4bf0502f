"""Final-answer extraction and equivalence for math benchmarks.

Extraction, in order (the first rule that finds something wins, and the rule is reported):

* ``hash``: the text after the last ``####`` (GSM8K style), up to the end of its line; when nothing
  but whitespace follows ``####`` on its line, the next line is read. The answer text is then read as
  described under *Reading an answer*.
* ``boxed``: the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (balanced braces, so
  ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), as written: it is LaTeX for math-verify.
* ``last_number``: a fallback over the whole text. Math spans (``$...$``, ``$$...$$``, ``\\(...\\)``,
  ``\\[...\\]``) that contain a digit are candidates, as are the plain numbers outside them; the one
  that ends last wins. A math span is read as described under *Reading an answer* (so
  ``$\\frac{1}{2}$`` gives ``\\frac{1}{2}``, never the 2 inside it, and ``\\[3 \\times 4 = 12\\]`` gives
  12); a plain number gives its value. A ``$`` counts as a math delimiter only as pandoc does: an
  opening ``$`` has a non-space on its right, a closing one a non-space on its left and no digit
  after it, so currency (``$5 and $10``) is not taken for math.

Before any rule, Unicode minus signs (U+2212 minus, U+2013 en dash, U+2012 figure dash, U+FE63 small
and U+FF0D full-width hyphen-minus) become ``-``; so an en dash between two numbers reads as a minus.

Numbers. A number is ``-``, digits with optional thousands commas (``1,234``; ``1,2`` is two numbers),
optional decimals, and an optional exponent (``1e3``, ``2.5E-4``, ``1.2×10^3``, ``1.2 \\times 10^{3}``,
written out as a plain decimal: ``1000``, ``0.00025``, ``1200``; math-verify would read ``1e3`` as
1·e·3). A ``-`` right after a letter, digit or closing bracket is a subtraction, not a sign
(``10-12`` holds 10 and 12). A fraction ``a/b`` is kept as written (``3/4``). A mixed number
``a b/c`` with ``b < c`` is the value a + b/c written as a reduced fraction (``2 1/2`` gives ``5/2``,
``-1 3/4`` gives ``-7/4``); ``2 4/2`` is not a mixed number but two numbers.

Reading an answer (the ``####`` text, or a fallback math span):

1. ``$`` and ``\\$`` are dropped (``-$5``, ``$-5`` and ``- $5`` give ``-5``), then trailing ``.,;:!``.
2. Equations: the answer is what follows the last ``=`` (or ``≈``, ``\\approx``), so ``2 + 3 = 5`` gives
   5 and ``x = -3`` gives -3, unless the text lists several statements (a ``,`` or ``;`` followed by a
   space, or the word ``and``): ``x = 3, y = 4`` is kept whole, never read as 4.
3. If exactly one number is left and everything around it is words or units (letters, also glued to
   the number as in ``42km``, spaces, ``%``, parentheses, ``\\text{...}``, ``-`` inside a word as in
   ``42-year-old``), the answer is that number: ``42 apples``, ``25%``, ``The answer is 12``,
   ``2 1/2 cups`` (5/2). A free-standing ``-`` is math: ``x - 5`` is kept whole.
4. Otherwise the text is kept as written for math-verify: expressions (``2 + 3``, ``3^2``,
   ``\\frac{1}{2}``, ``\\sqrt{2}``, ``2\\pi``), which math-verify evaluates, and several numbers joined
   by words (``3 hours and 30 minutes``), which math-verify reads as a set, so they match no single
   gold number: such an answer is graded wrong rather than silently graded as 3.

Equivalence is decided by math-verify (the grader used by open-r1 and lighteval), so ``\\frac12``
equals ``0.5`` and ``3,000`` equals ``3000``; a gold that is one number is read as above first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from omniopd.evaluation.stats import wilson_interval  # noqa: F401 - re-exported (runner, compare)

_HASH = re.compile(r"####\s*([^\n]*)")
_UNICODE_MINUS = str.maketrans({c: "-" for c in "\u2212\u2013\u2012\ufe63\uff0d"})

_NUMBER = re.compile(
    r"""
    (?P<sign>(?<![\w)\]}])-)?                       # a '-' after a word, digit or bracket is subtraction
    (?:
        (?P<whole>\d+)\s+(?P<num>\d+)\s*/\s*(?P<den>\d+)      # mixed number: 2 1/2
      | (?P<fnum>\d+)\s*/\s*(?P<fden>\d+)                    # fraction: 3/4
      | (?P<mant>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)   # 1,234.5  42  .5
        (?P<exp>[eE][+-]?\d+                                  # 1e3  2.5E-4
          | \s*(?:×|\\times|\\cdot)\s*10\s*\^\s*\{?[+-]?\d+\}?  # 1.2×10^3  1.2 \times 10^{3}
        )?
    )
    """,
    re.X,
)
# Math spans for the fallback: $$...$$, \[...\], \(...\), and $...$ with pandoc's rule against currency.
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|\$(?=\S)([^$]*?\S)\$(?!\d)", re.S)
_RELATION = re.compile(r"=|≈|\\approx")
_LIST_SEPARATOR = re.compile(r"[,;]\s|\band\b")  # "x = 3, y = 4", "x = 3 and y = 4"
# Words and units around the one number: no digit, no math sign, and '-' only inside a word ("42-year-old")
_WORDS_ONLY = re.compile(r"(?:[^\d\\^_{}\[\]+*/<>|=×÷√π∞-]|(?<=\w)-(?=\w))*")
_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}|\\%")  # \text{ apples} and \% count as words

EXTRACTION_RULES = ("hash", "boxed", "last_number")


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str | None  # which rule found it, None when unparsed


def _last_boxed(text: str) -> str | None:
    idx = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if idx < 0:
        return None
    i = text.index("{", idx) + 1
    depth, start = 1, i
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1].strip() if depth == 0 else None


def _numbers(s: str) -> list[tuple[int, int, str]]:
    """(start, end, value) of each number in ``s``, left to right, values normalised (see module doc)."""
    out: list[tuple[int, int, str]] = []
    for m in _NUMBER.finditer(s):
        sign = m["sign"] or ""
        if m["whole"] and int(m["num"]) < int(m["den"]):
            mixed = Fraction(int(m["whole"]) * int(m["den"]) + int(m["num"]), int(m["den"]))
            out.append((m.start(), m.end(), sign + str(mixed)))
        elif m["whole"]:  # "2 4/2" is not a mixed number: a number, then a fraction
            out.append((m.start(), m.start("num"), sign + m["whole"]))
            out.append((m.start("num"), m.end(), f"{m['num']}/{m['den']}"))
        elif m["fnum"]:
            out.append((m.start(), m.end(), f"{sign}{m['fnum']}/{m['fden']}"))
        else:
            value = sign + m["mant"].replace(",", "")
            if m["exp"]:
                exponent = int(re.findall(r"[+-]?\d+", m["exp"])[-1])
                value = format(Decimal(f"{value}E{exponent}"), "f")
            out.append((m.start(), m.end(), value))
    return out


def _read_answer(s: str) -> str:
    """A final answer as written (after ####, or a math span) -> the answer to grade (see module doc)."""
    s = s.replace("\\$", "").replace("$", "").strip().rstrip(".,;:!").strip()
    sides = [side for side in _RELATION.split(s) if side.strip()]
    if sides and not _LIST_SEPARATOR.search(s):
        s = sides[-1].strip()
    s = re.sub(r"^-\s+(?=\d)", "-", s)  # "- $5" -> "-5"
    numbers = _numbers(s)
    if len(numbers) == 1:
        start, end, value = numbers[0]
        if _WORDS_ONLY.fullmatch(_TEXT.sub(r" \1 ", s[:start] + "N" + s[end:])):  # N stands for the number
            return value
    return s


def _last_number(text: str) -> str | None:
    spans = [m for m in _MATH_SPAN.finditer(text) if re.search(r"\d", m.group())]
    outside = _MATH_SPAN.sub(lambda m: " " * len(m.group()), text)  # blank the spans, keep positions
    numbers = _numbers(outside)
    if spans and (not numbers or spans[-1].end() > numbers[-1][1]):
        content = next(g for g in spans[-1].groups() if g is not None)
        return _read_answer(content)
    return numbers[-1][2] if numbers else None


def extract_answer(text: str, rules: tuple[str, ...] = EXTRACTION_RULES) -> Extraction:
    text = text.translate(_UNICODE_MINUS)
    for rule in rules:
        if rule == "hash":
            found = _HASH.findall(text)
            if found and found[-1].strip():
                return Extraction(_read_answer(found[-1]), rule)
        elif rule == "boxed":
            boxed = _last_boxed(text)
            if boxed:
                return Extraction(boxed, rule)
        elif rule == "last_number":
            answer = _last_number(text)
            if answer:
                return Extraction(answer, rule)
        else:
            raise ValueError(f"unknown extraction rule {rule!r}; known: {EXTRACTION_RULES}")
    return Extraction(None, None)


def answers_match(gold: str, predicted: str | None) -> bool:
    """math-verify equivalence of a predicted final answer with the gold answer."""
    if predicted is None or not predicted.strip():
        return False
    from math_verify import parse, verify

    def _parse(s: str):
        s = s.strip()
        wrapped = s if s.startswith("$") else f"${s}$"
        return parse(wrapped) or parse(s)

    try:
        gold, predicted = gold.translate(_UNICODE_MINUS).strip(), predicted.translate(_UNICODE_MINUS)
        numbers = _numbers(gold)  # a gold that is one number ("3,000", "1e3") is read as extraction reads it
        if len(numbers) == 1 and numbers[0][:2] == (0, len(gold)):
            gold = numbers[0][2]
        gold_p, pred_p = _parse(gold), _parse(predicted)
        if not gold_p or not pred_p:
            return gold.strip() == predicted.strip()
        return bool(verify(gold_p, pred_p))
    except Exception:  # noqa: BLE001 - a grader crash on odd model text is a wrong answer, not a crash
        return gold.strip() == predicted.strip()

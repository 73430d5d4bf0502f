"""Final-answer extraction (``extract_answer``) on hand-written model outputs, one rule at a time.

Each case gives the text, the expected extracted answer and the rule that must have found it. The
answers are then graded with ``answers_match`` against hand-written golds, so that an extraction that
is "right" but unreadable for math-verify would still fail here.
"""

from __future__ import annotations

import pytest

from omniopd.evaluation.mathgrade import EXTRACTION_RULES, answers_match, extract_answer


def _check(text: str, answer: str | None, rule: str | None) -> None:
    ext = extract_answer(text)
    assert (ext.answer, ext.rule) == (answer, rule), text


# ---------------------------------------------------------------------------------------------------
# What was already right and must stay right.

@pytest.mark.parametrize("text, answer", [
    ("####42", "42"),                                  # no space after ####
    ("#### 42 apples", "42"),                          # unit words after the number
    ("#### 42.", "42"),                                # sentence full stop
    ("#### 42\n\nSome more text 17", "42"),            # text after the answer line is ignored
    ("#### 3,000", "3000"),                            # thousands separators
    ("#### 1,234,567.5 dollars", "1234567.5"),
    ("#### $5.50", "5.50"),                            # currency sign
    ("#### 3/4", "3/4"),                               # fractions are kept as written
    ("#### 25%", "25"),
    ("step 1: 6*7=42\n#### 40\nwait, no\n#### 42", "42"),  # the last #### wins
    ("#### The answer is 12", "12"),                   # words before the number
    ("#### $\\frac{1}{2}$", "\\frac{1}{2}"),           # LaTeX after #### is kept for math-verify
    ("#### \\sqrt{2}", "\\sqrt{2}"),                   # not the 2 inside
    ("#### 2\\pi", "2\\pi"),
    ("#### 42-year-old", "42"),                        # '-' inside a word is not math
    ("#### 42km", "42"),
    ("#### 5 \\text{ apples}", "5"),
    ("#### 10\\%", "10"),
    ("#### x - 5", "x - 5"),                           # a free-standing '-' is math: kept whole
    ("#### 42 - 7", "42 - 7"),
])
def test_hash_kept_behaviour(text, answer):
    _check(text, answer, "hash")


@pytest.mark.parametrize("text, answer", [
    ("first \\boxed{3}, then \\boxed{5}.", "5"),       # the last box wins
    ("so \\fbox{12}", "12"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),         # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{−7}", "-7"),                             # Unicode minus normalised in boxes too
])
def test_boxed_kept_behaviour(text, answer):
    _check(text, answer, "boxed")


def test_hash_line_edge_cases():
    _check("the answer is \\boxed{8}\n####", "8", "boxed")
    _check("#### \\boxed{8}", "\\boxed{8}", "hash")     # kept whole; math-verify reads the box
    _check("####\n9 is the answer", "9", "hash")          # an empty #### line: the answer may follow


# ---------------------------------------------------------------------------------------------------
# 1. An equation after #### : the answer is what follows the last '='.

@pytest.mark.parametrize("text, answer", [
    ("#### 2 + 3 = 5", "5"),
    ("#### 2+3 = 4+1 = 5 apples", "5"),
    ("#### x = -3", "-3"),
    ("#### 1,000 + 2,000 = 3,000", "3000"),
    ("#### 2 + 3", "2 + 3"),                           # expression without '=': kept, math-verify evaluates it
    ("#### 3^2", "3^2"),
    ("#### x = 3, y = 4", "x = 3, y = 4"),             # several equations: kept whole, never just "4"
])
def test_hash_equations_and_expressions(text, answer):
    _check(text, answer, "hash")


# 2. Currency signs around a negative number.
@pytest.mark.parametrize("text", ["#### -$5", "#### $-5", "#### -\\$5", "#### −$5", "#### -$5.", "#### - $5"])
def test_hash_negative_currency(text):
    _check(text, "-5", "hash")


# 3. Unicode minus signs (U+2212 minus, U+2013 en dash, U+2012 figure dash, U+FE63, U+FF0D).
@pytest.mark.parametrize("text, answer, rule", [
    ("#### −7", "-7", "hash"),
    ("#### –7", "-7", "hash"),
    ("#### ‒7", "-7", "hash"),
    ("#### ﹣7", "-7", "hash"),
    ("#### －7", "-7", "hash"),
    ("#### −1,500 meters", "-1500", "hash"),
    ("the temperature drops to −7 degrees", "-7", "last_number"),
    ("it ends at –2.5", "-2.5", "last_number"),
    ("so $x = −4$", "-4", "last_number"),
])
def test_unicode_minus(text, answer, rule):
    _check(text, answer, rule)


# 4. Scientific notation is kept whole (and written out as a plain decimal, since math-verify reads
#    "1e3" as 1*e*3 with Euler's e).
@pytest.mark.parametrize("text, answer, rule", [
    ("#### 1e3", "1000", "hash"),
    ("#### 2.5E-4", "0.00025", "hash"),
    ("#### 6.02e+23 atoms", "602000000000000000000000", "hash"),
    ("#### 1.2×10^3", "1200", "hash"),
    ("#### 1.2 \\times 10^{3}", "1200", "hash"),
    ("#### -3e2", "-300", "hash"),
    ("the rate is 1e-2 per second", "0.01", "last_number"),
])
def test_scientific_notation(text, answer, rule):
    _check(text, answer, rule)


# 5. The fallback prefers the last math span when it comes after the last plain number.
@pytest.mark.parametrize("text, answer", [
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is \\(\\frac{3}{4}\\)", "\\frac{3}{4}"),
    ("So we get \\[ 3 \\times 4 = 12 \\] in total", "12"),    # '=' rule applies inside the span
    ("we have $$2^{10}$$", "2^{10}"),
    ("from $\\frac{1}{2}$ of 10 we keep 5", "5"),             # a later plain number wins
    ("so $x = 7$ and that is it", "7"),
    ("He pays $5 for apples and $3 for pears, $8 in all.", "8"),   # currency, not math spans
    ("costs $5 and $10", "10"),
    ("He has $5. She has $12", "12"),
    ("first 3 then 17.", "17"),
    ("pages 10-12", "12"),                                    # a hyphen after a digit is not a sign
    ("it is -4", "-4"),
    ("so 3/4 of them", "3/4"),
    ("points (1,2)", "2"),                                    # "1,2" is not a thousands group
    ("total 1,234 items", "1234"),
])
def test_last_number_prefers_math_spans(text, answer):
    _check(text, answer, "last_number")


def test_last_number_ignores_math_spans_without_digits():
    _check("the value 9 solves $x^y$", "9", "last_number")


# 6. Mixed numbers, and several numbers joined by words.
@pytest.mark.parametrize("text, answer", [
    ("#### 2 1/2", "5/2"),
    ("#### 2 1/2 cups", "5/2"),
    ("#### -1 3/4", "-7/4"),
    ("#### 3 hours and 30 minutes", "3 hours and 30 minutes"),    # kept whole: never silently 3
    ("#### 5 dollars and 50 cents", "5 dollars and 50 cents"),
    ("#### 2 4/2", "2 4/2"),                                      # not a proper mixed number: kept
])
def test_mixed_numbers_and_several_numbers(text, answer):
    _check(text, answer, "hash")


def test_mixed_number_in_fallback():
    _check("he walked 2 1/2 miles", "5/2", "last_number")


def test_no_answer():
    _check("no digits here", None, None)
    ext = extract_answer("it is 42", EXTRACTION_RULES[:2])      # rules can be restricted
    assert (ext.answer, ext.rule) == (None, None)
    with pytest.raises(ValueError):
        extract_answer("42", ("nope",))


# ---------------------------------------------------------------------------------------------------
# The new outputs still grade correctly with math-verify.

@pytest.mark.parametrize("gold, text", [
    ("5", "#### 2 + 3 = 5"),
    ("5", "#### 2 + 3"),
    ("-7", "#### −7"),
    ("-5", "#### -$5"),
    ("1000", "#### 1e3"),
    ("0.00025", "#### 2.5E-4"),
    ("1200", "#### 1.2×10^3"),
    ("2.5", "#### 2 1/2"),
    ("0.5", "The answer is $\\frac{1}{2}$."),
    ("12", "So we get \\[ 3 \\times 4 = 12 \\] in total"),
    ("3000", "#### 3,000"),
    ("5.5", "#### $5.50"),
    ("0.75", "#### 3/4"),
    ("-1.75", "#### -1 3/4"),
    ("9", "#### 3^2"),
])
def test_extracted_answers_match_gold(gold, text):
    assert answers_match(gold, extract_answer(text).answer)


@pytest.mark.parametrize("gold, text", [
    ("3", "#### 3 hours and 30 minutes"),      # the bug: silently graded as 3
    ("30", "#### 3 hours and 30 minutes"),
    ("3", "#### 1e3"),
    ("1", "#### 1e3"),
    ("2", "#### 2 + 3 = 5"),
    ("7", "#### −7"),
    ("2", "The answer is $\\frac{1}{2}$."),
    ("4", "#### x = 3, y = 4"),
    ("1", "#### 2 1/2"),
])
def test_confidently_wrong_numbers_are_not_graded_correct(gold, text):
    assert not answers_match(gold, extract_answer(text).answer)


def test_gold_with_unicode_minus_or_exponent():
    assert answers_match("−7", "-7") and answers_match("1e3", "1000") and answers_match("3,000", "3000")

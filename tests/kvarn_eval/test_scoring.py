"""kvarn_eval.tasks.scoring and .needle on known answers."""

from __future__ import annotations

import pytest

from kvarn_eval.sandbox import run_python
from kvarn_eval.tasks import scoring
from kvarn_eval.tasks.needle import make_needle_items, needle_correct, split_sentences


@pytest.mark.parametrize("completion, expected", [
    (" Janet sells 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. So the answer is 18.", "18"),
    (" The answer is $1,234.", "1234"),
    (" She pays 5 + 7 = 12 dollars, then 3 more: 15", "15"),  # no "answer is": the last number
    (" So the answer is 7. Then 99 more words 100", "7"),  # the strict form wins over later numbers
    (" the answer is -3.5.", "-3.5"),
    (" I do not know.", None),
])
def test_extract_gsm8k_answer(completion, expected):
    assert scoring.extract_gsm8k_answer(completion) == expected


@pytest.mark.parametrize("completion, reference, ok", [
    ("So the answer is 18.", "18", True),
    ("So the answer is 18.00", "18", True),
    ("So the answer is 1,000.", "1000", True),
    ("So the answer is 17.", "18", False),
    ("no number", "18", False),
])
def test_gsm8k_correct(completion, reference, ok):
    assert scoring.gsm8k_correct(completion, reference) is ok


def test_gsm8k_prompt_layout():
    shots = [{"question": "Q1?", "answer": "A1. So the answer is 1."},
             {"question": "Q2?", "answer": "So the answer is 2."}]
    assert scoring.gsm8k_prompt("Q3?", shots) == (
        "Question: Q1?\nAnswer: A1. So the answer is 1.\n\n"
        "Question: Q2?\nAnswer: So the answer is 2.\n\nQuestion: Q3?\nAnswer:")


def test_truncate_at_the_earliest_stop():
    text = "    return a + b\n\ndef other():\n    pass\n# comment"
    assert scoring.truncate_at_stops(text, scoring.HUMANEVAL_STOPS) == "    return a + b\n"
    assert scoring.truncate_at_stops("no stop here", ("\n\n",)) == "no stop here"


PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_humaneval_program_runs_right_and_wrong_bodies():
    good = scoring.humaneval_program(PROMPT, "    return a + b\n", TEST, "add")
    bad = scoring.humaneval_program(PROMPT, "    return a - b\n", TEST, "add")
    assert good.endswith("check(add)\n")
    assert run_python(good).passed
    r = run_python(bad)
    assert r.status == "failed" and "AssertionError" in r.output


def test_mbpp_program_runs_setup_and_asserts():
    code = "def double(x):\n    return 2 * x"
    prog = scoring.mbpp_program(code, ["assert double(2) == 4", "assert double(K) == 20"], "K = 10")
    assert prog == "def double(x):\n    return 2 * x\nK = 10\nassert double(2) == 4\nassert double(K) == 20\n"
    assert run_python(prog).passed
    assert not run_python(scoring.mbpp_program(code, ["assert double(3) == 7"])).passed


@pytest.mark.parametrize("n, c, k, expected", [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 2, 2, 0.7),
                                               (4, 3, 2, 1.0)])
def test_pass_at_k(n, c, k, expected):
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError, match="n=2, c=3"):
        scoring.pass_at_k(2, 3, 1)


def test_pick_choice_sum_and_per_length():
    assert scoring.pick_choice([-5.0, -3.0, -4.0]) == 1
    assert scoring.pick_choice([-6.0, -3.0], lengths=[12, 3]) == 0  # -0.5 per byte beats -1.0
    assert scoring.pick_choice([-2.0, -2.0]) == 0  # ties go to the first
    with pytest.raises(ValueError, match="positive"):
        scoring.pick_choice([-1.0, -2.0], lengths=[1, 0])


class CharTokenizer:
    """One token per character: lengths are exact and easy to reason about."""

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = list(range(len(text)))

        return Out()


HAYSTACK = " ".join(f"Sentence number {i} says something about essays." for i in range(2000))


def test_split_sentences():
    assert split_sentences("One. Two!  Three? Four") == ["One.", "Two!", "Three?", "Four"]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_items_place_the_needle_at_depth(depth):
    (item,) = make_needle_items(CharTokenizer(), HAYSTACK, 4096, (depth,), seed=1)
    assert len(item.answer) == 7 and item.answer.isdigit()
    needle = f"One of the special magic numbers for {item.key} is: {item.answer}."
    assert item.prompt.count(needle) == 1
    assert 4096 - 60 <= len(item.prompt) <= 4096  # fills the budget to within one sentence
    body_start = item.prompt.index("afterwards.\n\n") + len("afterwards.\n\n")
    body_end = item.prompt.index("\n\nWhat is the special magic number")
    where = (item.prompt.index(needle) - body_start) / (body_end - body_start - len(needle))
    assert where == pytest.approx(depth, abs=0.02)
    assert item.prompt.endswith(f"The special magic number for {item.key} mentioned in the provided text is")


def test_needle_items_are_reproducible_and_differ_by_length():
    a = make_needle_items(CharTokenizer(), HAYSTACK, 4096, (0.5,), seed=0)
    assert a == make_needle_items(CharTokenizer(), HAYSTACK, 4096, (0.5,), seed=0)
    assert a[0].answer != make_needle_items(CharTokenizer(), HAYSTACK * 2, 8192, (0.5,), seed=0)[0].answer


def test_needle_rejects_bad_requests():
    with pytest.raises(ValueError, match="depth 1.5"):
        make_needle_items(CharTokenizer(), HAYSTACK, 4096, (1.5,))
    with pytest.raises(ValueError, match="too short"):
        make_needle_items(CharTokenizer(), "Tiny. Text.", 4096, (0.5,))


def test_needle_correct():
    assert needle_correct(" 4821937.", "4821937")
    assert needle_correct(" 4,821,937 is the number", "4821937")
    assert not needle_correct(" 4821936", "4821937")
    assert not needle_correct(" I forgot 7 of them: 4821937", "4821937")  # only the first number counts

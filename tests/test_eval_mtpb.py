"""MTPB: the packaged data, prompts, truncation, the program rewrite, the output check, sandboxed scoring and the pass rate.

Expected values are written by hand from CodeGen's MTPB protocol
(codegen1/benchmark/mtpb_sample.py and mtpb_exec.py in salesforce/CodeGen)
and from the benchmark's own expected outputs; reference solutions are
hand-written completions, one per turn, that a model reading each prompt
could have produced.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from fastcodegen.eval import mtpb, sandbox
from fastcodegen.eval.mtpb import MtpbResult

# sha256 of codegen1/benchmark/mtpb.jsonl in github.com/salesforce/CodeGen (last changed in 979d788c).
UPSTREAM_SHA256 = "3ab79ddb160f484a63491330ba72204930d56cc946f7c0c5fb469622a941f89c"

PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"


# ---------------------------------------------------------------------------
# the packaged data


def test_packaged_data_is_the_upstream_file():
    data = Path(mtpb.__file__).resolve().parent.parent / "data" / "mtpb"
    assert hashlib.sha256((data / "mtpb.jsonl").read_bytes()).hexdigest() == UPSTREAM_SHA256
    assert (data / "LICENSE.txt").read_text().startswith("Apache License Version 2.0")
    assert "salesforce/CodeGen" in (data / "README.md").read_text()


def test_problems_have_five_test_cases_and_fill_every_template():
    problems = mtpb.load_problems()
    assert [p.id for p in problems] == [str(i) for i in range(1, 116)]
    for p in problems:
        assert len(p.inputs) == len(p.outputs) == p.n_test_cases == 5, p.id
        assert p.n_turns >= 3 and p.max_gen_length in (128, 256, 512), p.id
        for inputs in p.inputs:
            for template in p.prompts:
                assert mtpb.template_fields(template) <= set(inputs), (p.id, template)
    # problem 57 lists a sixth output with no input: pairing in order drops it, as the sampler's zip does
    raw = {}
    with open(mtpb.DATA_FILE) as f:
        for line in f:
            r = json.loads(line)
            raw[r["id"]] = r
    assert [k for k, r in raw.items() if len(r["outputs"]) != 5] == ["57"]
    p57 = mtpb.load_problems(["57"])[0]
    assert list(p57.outputs) == raw["57"]["outputs"][:5]
    # seven problems set no max_gen_length: the sampler's default, 256
    no_length = [k for k, r in raw.items() if "max_gen_length" not in r]
    assert len(no_length) == 7
    assert all(p.max_gen_length == 256 for p in mtpb.load_problems(no_length))


def test_load_problems_selects_and_rejects():
    assert [p.id for p in mtpb.load_problems(["10", "2", 3])] == ["2", "3", "10"]
    assert [p.id for p in mtpb.load_problems(limit=4)] == ["1", "2", "3", "4"]
    assert [p.id for p in mtpb.load_problems(["7", "5", "6"], limit=2)] == ["5", "6"]
    p = mtpb.load_problems(["1"])[0]
    assert (p.name, p.category) == ("Sandwich string", "string")
    assert p.outputs[0] == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match=r"'0', '116'"):
        mtpb.load_problems(["1", "0", "116"])
    with pytest.raises(ValueError, match="ids"):
        mtpb.load_problems("12")
    with pytest.raises(ValueError, match="limit"):
        mtpb.load_problems(limit=0)


# ---------------------------------------------------------------------------
# prompts and truncation


def test_first_two_turn_prompts_by_hand():
    p = mtpb.load_problems(["1"])[0]
    first = mtpb.turn_prompt(p, 0, 0, [])
    assert first == (
        "# Import libraries.\n\nimport numpy as np\n\n" '# Assign the string "abcde" to a variable named "my_string".\n'
    )
    # the completion is cut at three newlines before it joins the history, followed by a blank line
    second = mtpb.turn_prompt(p, 0, 1, ['my_string = "abcde"\n\n\n\n# Lowercase it\nmy_string.lower()'])
    assert second == (
        "# Import libraries.\n\nimport numpy as np\n\n"
        '# Assign the string "abcde" to a variable named "my_string".\n'
        'my_string = "abcde"\n\n'
        '# Lowercase the given string "my_string".\n'
    )
    # another test case's inputs fill the same templates
    assert mtpb.turn_prompt(p, 3, 0, []) == (
        PREFIX + '# Assign the string "Jerry jERRY JeRRRY" to a variable named "my_string".\n'
    )


def test_prompts_format_lists_and_escaped_braces():
    p61 = mtpb.load_problems(["61"])[0]
    assert mtpb.turn_prompt(p61, 1, 0, []) == (
        PREFIX + '# Assign the matrix "[[3, 2, 5], [2, 3, 5]]" to a variable named "my_matrix".\n'
    )
    p46 = mtpb.load_problems(["46"])[0]
    assert mtpb.turn_prompts(p46, 0)[-1] == (
        'Print the sum of the first column of x_train and the sum of y_train. Use the format "{:.1f} {:.1f}".'
    )


def test_turn_prompt_rejects_bad_arguments():
    p = mtpb.load_problems(["1"])[0]
    with pytest.raises(ValueError, match="history"):
        mtpb.turn_prompt(p, 0, 2, ["x = 1"])
    with pytest.raises(ValueError, match="test_case_index"):
        mtpb.turn_prompt(p, 5, 0, [])
    with pytest.raises(ValueError, match="turn"):
        mtpb.turn_prompt(p, 0, 5, ["a"] * 5)
    with pytest.raises(ValueError, match="completions"):
        mtpb.source(p, ["x = 1"], 0)


@pytest.mark.parametrize(
    "completion, cut",
    [
        ("x = 1\nprint(x)\ny = 2\nprint(y)\n", "x = 1\nprint(x)\ny = 2\n"),  # a second print line
        ("def f():\n    return 1\n\ndef g():\n    return 2\n", "def f():\n    return 1\n\n"),  # a second def
        ("    print(a)\nprint(b)\n", "    print(a)\nprint(b)\n"),  # an indented print is not a line start
        ("x = 1\n# the next step\ny = 2", "x = 1\n"),
        ("x = 1<|endoftext|>garbage", "x = 1"),
        ("x = 1\n'''doc'''\n", "x = 1\n"),
        ('x = 1\n"""doc"""\n', "x = 1\n"),
        ("x = 1\n\n\ny = 2", "x = 1"),
        ("# a comment first\nx = 1", ""),
        ("x = 1  # a trailing comment\ny = 2\n", "x = 1  # a trailing comment\ny = 2\n"),
        ("print(1)\nx = 2\n\n\nprint(3)", "print(1)\nx = 2"),  # the earliest cut wins
    ],
)
def test_truncate_by_hand(completion, cut):
    assert mtpb.truncate(completion) == cut


def test_truncate_is_idempotent():
    rng = random.Random(1234)
    atoms = [
        "print(x)",
        "def f():",
        "    return 1",
        "# c",
        "'''",
        '"""',
        "<|endoftext|>",
        "\n",
        "\n\n",
        "x = 1",
        "printf",
    ]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) + rng.choice(["", "\n"]) for _ in range(rng.randint(0, 10)))
        once = mtpb.truncate(text)
        assert text.startswith(once) and mtpb.truncate(once) == once, text


# ---------------------------------------------------------------------------
# the program: rewrite and check


@pytest.mark.parametrize(
    "code, rewritten",
    [
        ("x = 5", "x = print(5)"),
        ("formatted", "print(formatted)"),
        ("a = 1\nb", "a = 1\nprint(b)"),
        ("df.head()", "print(df.head())"),
        ("obj.print(3)", "print(obj.print(3))"),
        ("x += 1", "x += print(1)"),
        ("print(x)  # done", "print(x)  # done"),  # unchanged, comments kept
        ("printer(3)", "printer(3)"),  # a name starting with print counts as printing
        ("y = print(3)", "y = print(3)"),
        ("for i in range(3):\n    pass", "for i in range(3):\n    pass"),  # no value: unchanged
        ("def f():\n    return 1", "def f():\n    return 1"),
        ("x = (1,", "x = (1,"),  # a syntax error: run as is
        ("# nothing", "# nothing"),
        ("x: int", "x: int"),
    ],
)
def test_rewrite_with_print_by_hand(code, rewritten):
    assert mtpb.rewrite_with_print(code) == rewritten


class Series:
    """Stands in for pandas.Series (pandas is not a test dependency): the check recognises it by its type's name."""

    __module__ = "pandas.core.series"

    def __init__(self, values):
        self.values = values

    def to_numpy(self):
        return np.array(self.values)


@pytest.mark.parametrize(
    "output, expected, same",
    [
        ([1, 2], [1, 2], True),
        ((1, 2), [1, 2], True),  # a tuple is converted to the expected list
        ([(1, 2), (3, 4)], [[1, 2], [3, 4]], True),
        (np.int64(7), 7, True),
        (np.int32(7), 7.0, True),
        (np.float32(2.5), 2.5, True),
        (np.bool_(True), True, True),
        (np.array([1.0, 2.0]), [1.0, 2.0], True),
        (2.9, 2, True),  # int(2.9) == 2
        ("3", 3, True),
        (3, "3", True),
        ("False", False, True),  # against a boolean, compared as text
        (0, False, False),
        ("true", True, False),
        (1.0000001, 1.0, True),
        (1.00001, 1.0, False),
        ("abc", "abd", False),
        (Series([35.5, 66.5]), [35.5, 66.5000000001], True),
        (Series([35.5, 66.5]), [35.5, 66.6], False),
    ],
)
def test_equivalent_by_hand(output, expected, same):
    assert mtpb.equivalent(output, expected) is same


@pytest.mark.parametrize("output, expected", [(None, None), ({"a": 1}, {"a": 1}), ("None", None), ("abc", 3)])
def test_equivalent_raises_where_the_check_cannot_compare(output, expected):
    with pytest.raises((ValueError, TypeError)):
        mtpb.equivalent(output, expected)


def test_source_is_the_recorded_history():
    p = mtpb.load_problems(["3"])[0]
    completions = ["def m(x):\n    return x * 60\n", "def h(x):\n    return x * 3600\n", "print(h(2) + m(13))\n"]
    assert mtpb.source(p, completions, 0) == (
        PREFIX
        + "# Write a function that takes an integer minutes and converts it to seconds.\n"
        + "def m(x):\n    return x * 60\n\n\n"
        + "# Write a function that takes an integer hours and converts it to seconds.\n"
        + "def h(x):\n    return x * 3600\n\n\n"
        + "# Print the total seconds of 2 hours and 13 minutes.\n"
        + "print(h(2) + m(13))\n\n\n"
    )


# ---------------------------------------------------------------------------
# running programs: reference solutions pass, broken ones fail with their reason


def _solutions(problem_id: str, inputs: dict) -> list[str]:
    """Hand-written completions, one per turn, for one test case's prompts."""
    if problem_id == "1":  # string
        return [
            f'my_string = "{inputs["A"]}"\n',
            "my_string = my_string.lower()\n",
            "chars = set(my_string)\n",
            "chars = sorted(chars)\n",
            "print(chars)\n",
        ]
    if problem_id == "2":  # math; the last turn leaves a bare expression, which the rewrite prints
        return [
            f"numbers = {inputs['numbers']}\n",
            "total = sum(numbers)\n",
            "normalized = [x / total * 100 for x in numbers]\n",
            'formatted = ["%.1f" % x for x in normalized]\n',
            "formatted\n",
        ]
    if problem_id == "5":  # array
        return [
            f"my_numbers = {inputs['A']}\n",
            "n_neg = sum(1 for x in my_numbers if x < 0)\n",
            "n_pos = sum(1 for x in my_numbers if x > 0)\n",
            "print(max(n_neg, n_pos))\n",
        ]
    if problem_id == "7":  # algorithm
        a1, a2 = inputs["a1"], inputs["a2"]
        return [
            "def fizz_buzz(n):\n"
            f"    if n % {a1} == 0 and n % {a2} == 0:\n"
            '        return "fizzbuzz"\n'
            f"    if n % {a1} == 0:\n"
            '        return "fizz"\n'
            f"    if n % {a2} == 0:\n"
            '        return "buzz"\n'
            "    return n\n",
            f"numbers = list(range({inputs['a3']}, {inputs['a4']} + 1))\n",
            "new_list = [fizz_buzz(n) for n in numbers]\n",
            "print(new_list)\n",
        ]
    if problem_id == "12":  # class
        return [
            "class Player:\n"
            "    def __init__(self, name, age, height, weight):\n"
            "        self.name, self.age, self.height, self.weight = name, age, height, weight\n",
            "class Player(Player):\n"
            "    def get_age(self):\n"
            '        return f"{self.name} is age {self.age}"\n'
            "    def get_height(self):\n"
            '        return f"{self.name} is {self.height} cm"\n'
            "    def get_weight(self):\n"
            '        return f"{self.name} weighs {self.weight} kg"\n',
            f'player = Player("{inputs["a1"]}", {inputs["a2"]}, {inputs["a3"]}, {inputs["a4"]})\n',
            f"print(player.get_{inputs['a5']}())\n",
        ]
    if problem_id == "50":  # dict; boolean outputs
        return [
            "def to_plural(words):\n    return {w + 's' if words.count(w) > 1 else w for w in words}\n",
            "def is_plural(word):\n    return word.endswith('s')\n",
            f"words = {inputs['a1']}\n",
            "words_plural = to_plural(words)\n",
            "contains_plural = any(is_plural(w) for w in words_plural)\n",
            "print(contains_plural)\n",
        ]
    if problem_id == "63":  # data science; prints a numpy integer
        return [
            f"a = np.array({inputs['A']})\n",
            f"b = np.array({inputs['B']})\n",
            "result = a @ b\n",
            "print(result.sum())\n",
        ]
    if problem_id == "115":  # data science; prints a numpy float
        return [
            f"my_array = np.array({inputs['A']})\n",
            "mean_number = np.mean(my_array)\n",
            "median_number = np.median(my_array)\n",
            "print(mean_number - median_number)\n",
        ]
    raise KeyError(problem_id)


REFERENCE_IDS = ["1", "2", "5", "7", "12", "50", "63", "115"]


def _samples(problems, solve=_solutions, sample_index=0):
    return [
        {"task_id": p.id, "test_case": k, "sample_index": sample_index, "completions": solve(p.id, p.inputs[k])}
        for p in problems
        for k in range(p.n_test_cases)
    ]


def test_reference_solutions_pass_every_test_case():
    problems = mtpb.load_problems(REFERENCE_IDS)
    assert len({p.category for p in problems}) == 7
    results = mtpb.score(problems, _samples(problems), workers=2)
    failed = [(r.task_id, r.test_case, r.reason) for r in results if not r.passed]
    assert not failed
    assert [(r.task_id, r.test_case) for r in results] == [(p.id, k) for p in problems for k in range(5)]
    s = mtpb.summary(results, problems)
    assert s["pass_rate"] == 1.0 and s["programs"] == s["programs_passed"] == 40


def _broken(problem_id: str, inputs: dict) -> list[str]:
    good = _solutions(problem_id, inputs)
    if problem_id == "5":  # wrong logic: the smaller count
        return good[:-1] + ["print(min(n_neg, n_pos))\n"]
    if problem_id == "1":  # an exception before anything is printed
        return good[:2] + ["chars = set(my_strin)\n"] + good[3:]
    if problem_id == "7":  # no print, and nothing the rewrite can print
        return good[:-1] + ["for item in new_list:\n    pass\n"]
    if problem_id == "2":  # the right answer printed, then an exception: the output still counts
        return good[:-1] + ["print(formatted)\nraise RuntimeError('after the answer')\n"]
    raise KeyError(problem_id)


def test_broken_solutions_fail_with_their_reason():
    problems = mtpb.load_problems(["1", "2", "5", "7"])
    samples = [s for s in _samples(problems, _broken) if s["test_case"] in (0, 1)]
    results = {(r.task_id, r.test_case): r for r in mtpb.score(problems, samples, workers=2)}
    wrong = results["5", 0]
    # test case 0 is [1,2,3,4]: min(0 negatives, 4 positives) = 0, expected 4
    assert not wrong.passed and wrong.output == "0" and wrong.reason == "wrong output 0, expected 4"
    raised = results["1", 1]
    assert not raised.passed and raised.output is None
    assert raised.reason.startswith("the program printed nothing") and "NameError" in raised.reason
    silent = results["7", 0]
    assert not silent.passed and silent.reason == "the program printed nothing"
    late = results["2", 0]
    assert late.passed and late.reason == ""
    assert all(not results[pid, k].passed for pid in ("1", "5", "7") for k in (0, 1))


def test_program_time_limit_and_last_print():
    p = mtpb.load_problems(["5"])[0]
    good = _solutions("5", p.inputs[0])
    # printed the answer, then ran past the time limit: the original executor keeps the output
    looping_after = mtpb.program(p, good[:-1] + ["print(max(n_neg, n_pos))\nwhile True:\n    pass\n"], 0, 1.0)
    looping_before = mtpb.program(p, good[:-1] + ["while True:\n    pass\nprint(max(n_neg, n_pos))\n"], 0, 1.0)
    # the last print's first argument is the output: an earlier right answer does not count
    overwritten = mtpb.program(p, good[:-1] + ["print(max(n_neg, n_pos))\nif True:\n    print('5', 4)\n"], 0)
    # ... but a second top-level print line is cut off the completion before the program is run
    cut = mtpb.program(p, good[:-1] + ["print(max(n_neg, n_pos))\nprint('done')\n"], 0)
    runs = sandbox.run_programs([looping_after, looping_before, overwritten, cut], workers=2)
    after, before, last, cut_run = runs
    assert mtpb.check_output(p, 0, after.stdout)
    assert not mtpb.check_output(p, 0, before.stdout)
    assert "ran past the 1 s time limit" in mtpb.read_report(before.stdout)["reason"]
    assert not mtpb.check_output(p, 0, last.stdout)
    assert mtpb.read_report(last.stdout)["reason"] == "wrong output '5', expected 4"
    assert mtpb.check_output(p, 0, cut_run.stdout)
    with pytest.raises(ValueError, match="test case 0"):
        mtpb.check_output(p, 1, after.stdout)


def test_a_program_without_a_verdict_fails():
    p = mtpb.load_problems(["5"])[0]
    sample = {"task_id": "5", "test_case": 0, "sample_index": 0, "completions": _solutions("5", p.inputs[0])}
    sample["completions"][-1] = "import os\nos._exit(0)\n"
    (result,) = mtpb.score([p], [sample])
    assert not result.passed and result.reason.startswith("the program gave no verdict")
    assert not mtpb.check_output(p, 0, "")


def test_score_rejects_malformed_samples():
    problems = mtpb.load_problems(["5"])
    good = {"task_id": "5", "test_case": 0, "sample_index": 0, "completions": ["a", "b", "c", "d"]}
    for bad, match in [
        ({k: v for k, v in good.items() if k != "test_case"}, "test_case"),
        ({**good, "task_id": "6"}, "task_id"),
        ({**good, "test_case": 5}, "test_case"),
        ({**good, "completions": ["a"]}, "4 turns"),
        ({**good, "sample_index": -1}, "sample_index"),
    ]:
        with pytest.raises(ValueError, match=match):
            mtpb.score(problems, [bad])
    with pytest.raises(ValueError, match="second sample"):
        mtpb.score(problems, [good, dict(good)])


# ---------------------------------------------------------------------------
# the pass rate


def _results(task_id: str, passed: int, total: int) -> list[MtpbResult]:
    return [MtpbResult(task_id, i % 5, i // 5, i < passed, "", None, 0.0) for i in range(total)]


def test_summary_averages_problems_by_hand():
    problems = mtpb.load_problems(["1", "2", "3"])  # string, math, math
    results = _results("1", 7, 10) + _results("2", 1, 4) + _results("3", 2, 2)
    random.Random(0).shuffle(results)
    s = mtpb.summary(results, problems)
    # per problem 7/10, 1/4, 2/2; the paper's average over problems, not over programs (10/16)
    assert s["pass_rate"] == pytest.approx((0.7 + 0.25 + 1.0) / 3)
    assert (s["problems"], s["programs"], s["programs_passed"]) == (3, 16, 10)
    assert s["categories"] == {
        "math": {"problems": 2, "pass_rate": pytest.approx((0.25 + 1.0) / 2)},
        "string": {"problems": 1, "pass_rate": pytest.approx(0.7)},
    }
    assert s["per_problem"]["2"] == {"category": "math", "programs": 4, "passed": 1, "pass_rate": 0.25}


def test_summary_rejects_mismatched_results():
    problems = mtpb.load_problems(["1", "2"])
    with pytest.raises(ValueError, match="2"):
        mtpb.summary(_results("1", 1, 5), problems)
    with pytest.raises(ValueError, match="'3'"):
        mtpb.summary(_results("1", 1, 5) + _results("2", 1, 5) + _results("3", 1, 5), problems)


def test_template_fields():
    assert mtpb.template_fields('Assign "{A}" and {{x}} to {b}') == {"A", "b"}
    assert mtpb.template_fields("no fields") == set()
    assert mtpb.template_fields("{ab}{c}{ab}") == {"ab", "c"}

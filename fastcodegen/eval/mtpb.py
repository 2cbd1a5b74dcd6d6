"""MTPB, the Multi-Turn Programming Benchmark of CodeGen: prompts, programs, output checks and the pass rate.

The protocol is CodeGen's own: `codegen1/benchmark/mtpb_sample.py` (sampling)
and `codegen1/benchmark/mtpb_exec.py` (execution and checking) in
github.com/salesforce/CodeGen, and section 4 of the paper, "CodeGen: An Open
Large Language Model for Code with Multi-Turn Program Synthesis" (Nijkamp et
al., ICLR 2023). This module follows it as follows.

Problems. 115 problems (`fastcodegen/data/mtpb/mtpb.jsonl`), each a list of
prompt templates, one per turn, and test cases: an input set (values for the
templates' `{name}` fields) and the expected output, paired in order. Every
problem has 5; problem 57 lists a sixth output with no input, which pairing
drops. A problem without `max_gen_length` draws up to 256 tokens a turn.

Sampling is done per test case. The test case's inputs fill every template
(`str.format`), so a sampled program holds that test case's values and is only
ever checked against that test case's expected output: nothing is substituted
into generated code afterwards, and n samples of a problem are 5 * n
multi-turn generations. The prompt of turn t (`turn_prompt`) is

    PREFIX + sum_{j<t} ("# " + prompt_j + "\\n" + truncate(completion_j) + "\\n\\n") + "# " + prompt_t + "\\n"

with PREFIX = "# Import libraries.\\n\\nimport numpy as np\\n\\n". The sampler
draws with temperature 0.2 and top-p 0.95 by default (TEMPERATURE, TOP_P), and
cuts each turn's completion with `truncate`: at a second line starting with
`print`, at a second line starting with `def`, and at CodeGen's stop patterns
(`fastcodegen.sampling_params.CODEGEN_STOP_PATTERNS`), whichever comes first.

Execution. A sample's program is its whole history after the last turn: the
prefix, then each turn's prompt comment, its cut completion and a blank line
(`source`). Unless its last top-level statement already
has a value that is a call of a function whose name starts with `print`, that
statement's value is wrapped in `print(...)` by rewriting the syntax tree
(`rewrite_with_print`: so `x = 5` becomes `x = print(5)`; a statement without
a value, or code that does not parse, is left as it is). The program is run in
a namespace where `print` also records its arguments; the run ends at its end,
at an exception, or after 20 seconds, and in each case the output is the first
argument of the last `print` call made: a program that printed the answer and
then raised or ran out of time still passes, one that printed nothing fails.

Check (`equivalent`). A pandas Series is compared with numpy.allclose; numpy
arrays become lists, numpy integer, float and bool scalars Python ones, lists
of tuples lists of lists. Then an output whose type
differs from the expected one is converted to it (`int(2.9)` is 2, `str(3)` is
"3"), except against a boolean, where both are compared as text. str, int,
bool, list, set and tuple compare with ==, floats within 1e-6, arrays with
numpy.allclose; any other expected type (the JSON null of two test cases of
problem 41, the dicts of problem 89) is an error, so those 7 test cases never
pass. Problems 38 and 46 read Kaggle CSV files from `./datasets/`, which are
not published with the benchmark, so they fail too: a perfect model scores
(111 + 3/5) / 115 = 97.0% here. Problems 6 (and 38, 46) need pandas and 14
scikit-learn in the interpreter that runs the programs.

Pass rate. A test case passes for a sample when its output is equivalent to
the expected one. The paper draws 40 samples for each test case, computes a
pass rate for each problem (the fraction of its 5 * 40 programs that pass)
and reports the average over problems (`summary`).

Here the comparison needs the printed Python object, not the text on stdout,
so it runs inside the sandboxed program: `program` writes a harness that runs
the rewritten program as above (`run_test_case`, with `equivalent`, whose
source it embeds) and ends by writing one line, `MTPB-RESULT {json}`, to its
standard output; `check_output` reads that line. The sandbox sets
OMP_NUM_THREADS=1, as the original executor does. Differences from it, which
ran every program in the evaluating process itself: each program gets a
fresh interpreter in `fastcodegen.eval.sandbox` (no state leaks from one to
the next); the sandbox confines it, where the original disabled destructive
`os`, `shutil` and `subprocess` functions (a program calling one failed); and
`sys.exit()` ends the program like an exception instead of ending the whole
evaluation.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import string
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from fastcodegen.sampling_params import CODEGEN_STOP_PATTERNS
from fastcodegen.stopping import PatternStops

if TYPE_CHECKING:
    from fastcodegen.eval.sandbox import SandboxLimits

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "mtpb" / "mtpb.jsonl"

PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"
# The sampler's per-turn length when a problem sets none, and its sampling defaults.
DEFAULT_MAX_GEN_LENGTH = 256
TEMPERATURE = 0.2
TOP_P = 0.95
# The executor's time limit for one program, in seconds.
EXEC_TIME_LIMIT_S = 20.0
# The sandbox's own limit leaves room to start Python and import numpy before the program's 20 s begin.
SANDBOX_MARGIN_S = 10.0
RESULT_MARKER = "MTPB-RESULT "


@dataclass(frozen=True)
class MtpbProblem:
    """One MTPB problem.

    Attributes:
        id: "1" to "115".
        name, category, description: as in the data.
        prompts: the turns' prompt templates, `{name}` fields filled from a test case's inputs.
        inputs: the test cases' input sets, one mapping per test case.
        outputs: the test cases' expected outputs, paired with `inputs` in order.
        max_gen_length: most new tokens per turn.
    """

    id: str
    name: str
    category: str
    description: str
    prompts: tuple[str, ...]
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Any, ...]
    max_gen_length: int

    @property
    def n_turns(self) -> int:
        """How many turns (prompts) the problem has."""
        return len(self.prompts)

    @property
    def n_test_cases(self) -> int:
        """How many test cases the problem has (5 for every problem)."""
        return len(self.inputs)


@dataclass(frozen=True)
class MtpbResult:
    """The verdict on one program: one sample of one test case of one problem.

    `reason` says why it failed ("" when it passed); `output` is the repr of
    the value it printed last (shortened), or None when there was none.
    """

    task_id: str
    test_case: int
    sample_index: int
    passed: bool
    reason: str
    output: Optional[str]
    duration_s: float


def _problem_from_json(raw: Mapping[str, Any]) -> MtpbProblem:
    # zip pairs inputs and outputs as the sampler does, dropping problem 57's unpaired sixth output.
    pairs = list(zip(raw["inputs"], raw["outputs"]))
    return MtpbProblem(
        id=str(raw["id"]),
        name=raw["name"],
        category=raw["category"],
        description=raw["description"],
        prompts=tuple(raw["prompts"]),
        inputs=tuple(inp for inp, _ in pairs),
        outputs=tuple(out for _, out in pairs),
        max_gen_length=int(raw.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)),
    )


def load_problems(ids: Optional[Sequence[str]] = None, limit: Optional[int] = None) -> list[MtpbProblem]:
    """The MTPB problems shipped with fastcodegen, in id order.

    Args:
        ids: problem ids ("1" to "115"; integers are accepted too); None for all.
        limit: keep only the first `limit` problems (after `ids`); None for all.

    Raises ValueError naming unknown ids, or for a bad `limit`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: must be a positive integer or None, got {limit!r}")
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"ids: a sequence of problem ids, not one string ({ids!r}); pass [{ids!r}]")
    with open(DATA_FILE, encoding="utf-8") as f:
        problems = [_problem_from_json(json.loads(line)) for line in f if line.strip()]
    problems.sort(key=lambda p: int(p.id))
    if ids is not None:
        wanted = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (str, int)):
                raise ValueError(f"ids: problem ids are strings or integers, got {i!r}")
            wanted.append(str(i).strip())
        known = {p.id for p in problems}
        unknown = [i for i in dict.fromkeys(wanted) if i not in known]
        if unknown:
            raise ValueError(
                f"ids: unknown MTPB problem ids {', '.join(map(repr, unknown))}; the ids are '1' to '{len(problems)}'"
            )
        problems = [p for p in problems if p.id in set(wanted)]
    return problems if limit is None else problems[:limit]


def template_fields(template: str) -> set[str]:
    """The names of the `{name}` fields of a prompt template (escaped `{{ }}` are not fields)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _check_test_case(problem: MtpbProblem, test_case_index: int) -> None:
    if isinstance(test_case_index, bool) or not isinstance(test_case_index, int):
        raise ValueError(f"test_case_index: must be an integer, got {test_case_index!r}")
    if not 0 <= test_case_index < problem.n_test_cases:
        raise ValueError(
            f"test_case_index: problem {problem.id} has test cases 0 to {problem.n_test_cases - 1}, "
            f"got {test_case_index}"
        )


def turn_prompts(problem: MtpbProblem, test_case_index: int) -> list[str]:
    """The problem's prompts with the test case's inputs filled in, one per turn."""
    _check_test_case(problem, test_case_index)
    return [template.format(**problem.inputs[test_case_index]) for template in problem.prompts]


def _comment(prompt: str) -> str:
    return f"# {prompt}\n"


def _history(prompts: Sequence[str], completions: Sequence[str]) -> str:
    return PREFIX + "".join(_comment(p) + truncate(c) + "\n\n" for p, c in zip(prompts, completions))


def _check_completions(name: str, completions: Sequence[str]) -> None:
    if isinstance(completions, (str, bytes)):
        raise ValueError(f"{name}: a sequence of completions, one per turn, not one string")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise ValueError(f"{name}[{i}]: a completion is a string, got {type(c).__name__}")


def turn_prompt(problem: MtpbProblem, test_case_index: int, turn: int, history: Sequence[str]) -> str:
    """The prompt the model completes at `turn` (0-based) of a test case.

    The benchmark's prefix, then each earlier turn's prompt as a comment line
    followed by its completion cut by `truncate` and a blank line, then this
    turn's prompt as a comment line. `history` holds the completions of turns
    0 to turn - 1 (cut or not: `truncate` leaves a cut completion unchanged).
    """
    prompts = turn_prompts(problem, test_case_index)
    if isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn < problem.n_turns:
        raise ValueError(f"turn: problem {problem.id} has turns 0 to {problem.n_turns - 1}, got {turn!r}")
    _check_completions("history", history)
    if len(history) != turn:
        raise ValueError(
            f"history: turn {turn} needs the completions of the {turn} turns before it, got {len(history)}"
        )
    return _history(prompts[:turn], history) + _comment(prompts[turn])


def truncate(completion: str) -> str:
    """Cuts one turn's completion as CodeGen's MTPB sampler does.

    At the start of a second line that begins with `print`, at the start of a
    second line that begins with `def`, and at the first match of CodeGen's
    stop patterns (a line starting with `#`, `'''` or `\"\"\"`, end-of-text,
    three newlines), whichever comes first. Cutting twice changes nothing.

    An engine that stops generating at `CODEGEN_STOP_PATTERNS` gives the
    same text after `truncate` as one that draws all `max_gen_length`
    tokens: every cut is at the earliest match.
    """
    for second_of in (r"^print", r"^def"):
        starts = [m.start() for m in re.finditer(second_of, completion, re.MULTILINE)]
        if len(starts) > 1:
            completion = completion[: starts[1]]
    stop = PatternStops(CODEGEN_STOP_PATTERNS).search(completion)
    return completion if stop is None else completion[: stop[0]]


def source(problem: MtpbProblem, completions: Sequence[str], test_case_index: int) -> str:
    """The multi-turn program of one sample, as the sampler records it.

    The prefix, then for every turn its prompt as a comment line, its
    completion cut by `truncate`, and a blank line.
    """
    prompts = turn_prompts(problem, test_case_index)
    _check_completions("completions", completions)
    if len(completions) != problem.n_turns:
        raise ValueError(
            f"completions: problem {problem.id} has {problem.n_turns} turns, got {len(completions)} completions"
        )
    return _history(prompts, completions)


def rewrite_with_print(code: str) -> str:
    """`code` with its last top-level statement's value printed, as the MTPB executor rewrites programs.

    Unchanged when that value is already a call of a function whose name
    starts with "print", when the statement has no value (a loop, a def, an
    import), or when the code does not parse; otherwise the statement's value
    becomes `print(value)` (so `x = 5` becomes `x = print(5)`) and the code is
    regenerated from its syntax tree, without its comments.
    """
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        value = last.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id.startswith("print"):
            return code
        last.value = ast.Call(func=ast.Name(id="print", ctx=ast.Load()), args=[value], keywords=[])
        ast.fix_missing_locations(tree)
        return ast.unparse(tree)
    except Exception:
        # The executor runs code it cannot rewrite (a syntax error, an empty program) as it is.
        return code


def equivalent(output: Any, expected: Any) -> bool:
    """The MTPB executor's type-relaxed comparison of a printed value with the expected output.

    Raises ValueError for an expected output of a type it does not compare
    (None, a dict), and whatever converting `output` to the expected type
    raises; a program whose comparison raises fails.

    Self-contained (it imports what it needs): `program` copies its source
    into the harness it writes.
    """
    try:
        import numpy as np
    except ImportError:  # a program that gets here without numpy printed no numpy value
        np = None

    kind = type(output)
    if kind.__module__ == "pandas.core.series" and kind.__name__ == "Series":
        output, expected = output.to_numpy(), np.array(expected)
    elif kind is list:
        if output and type(output[0]) is tuple:
            output = [list(item) for item in output]
    elif np is not None and kind in (np.uint8, np.int16, np.int32, np.int64):
        output = int(output)
    elif np is not None and kind in (np.float16, np.float32, np.float64):
        output = float(output)
    elif np is not None and kind is np.bool_:
        output = bool(output)
    elif np is not None and kind is np.ndarray:
        output = output.tolist()

    if type(output) is not type(expected):
        if type(expected) is bool:
            # bool("False") is True: against a boolean, both sides are compared as text.
            output, expected = str(output), str(expected)
        else:
            output = type(expected)(output)

    kind = type(output)
    if kind in (str, int, set, list, bool, tuple):
        return output == expected
    if kind is float:
        return abs(output - expected) < 1e-6
    if np is not None and kind is np.ndarray:
        return bool(np.allclose(output, expected))
    raise ValueError(f"the check does not compare values of type {kind.__name__}")


def run_test_case(code: str, expected: Any, time_limit_s: float) -> dict:
    """Runs one (rewritten) MTPB program in this process and checks what it printed last against `expected`.

    Returns {"passed": bool, "reason": str, "output": repr of the last printed
    value or None}. This executes `code`: it is meant for the sandboxed
    harness `program` writes, which copies its source. Self-contained.
    """
    import builtins
    import contextlib
    import io
    import signal

    class TimeLimit(Exception):
        pass

    def on_alarm(signum, frame):
        raise TimeLimit(f"ran past the {time_limit_s:g} s time limit")

    def short(value):
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__} without a repr>"
        return text if len(text) <= 200 else text[:197] + "..."

    # The program sees the names the original executor leaves in its namespace.
    namespace = {"print_stack": [], "__name__": "__main__", "builtins": builtins}

    def recording_print(*args, **kwargs):
        namespace["print_stack"].append({"args": args, "kwargs": kwargs})
        return builtins.print(*args, **kwargs)

    namespace["print"] = recording_print
    raised = None
    output = None
    passed = False
    try:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, time_limit_s)
        timed = True
    except (AttributeError, ValueError):  # no SIGALRM here, or not the main thread: the sandbox's limit remains
        timed = False
    try:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    exec(code, namespace)
                except (Exception, SystemExit) as e:
                    # Like the original: an error or the time limit ends the program, and what it printed counts.
                    raised = e
            stack = namespace["print_stack"]
            if not stack:
                reason = "the program printed nothing"
            elif not stack[-1]["args"]:
                reason = "the program's last print() had no arguments"
            else:
                value = stack[-1]["args"][0]
                output = short(value)
                try:
                    passed = bool(equivalent(value, expected))  # noqa: F821 (defined beside it in the harness)
                    reason = "" if passed else f"wrong output {output}, expected {short(expected)}"
                except Exception as e:
                    reason = f"output {output} not comparable with {short(expected)}: {type(e).__name__}: {e}"
        except TimeLimit as e:
            reason = f"the check {e}"
        except Exception as e:
            reason = f"the check failed: {type(e).__name__}: {e}"
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
    if not passed and raised is not None:
        what = str(raised) if isinstance(raised, TimeLimit) else f"raised {type(raised).__name__}: {raised}"
        reason += f" (the program {what})"
    return {"passed": passed, "reason": reason, "output": output}


def program(
    problem: MtpbProblem, completions: Sequence[str], test_case_index: int, time_limit_s: float = EXEC_TIME_LIMIT_S
) -> str:
    """The program the sandbox runs for one sample of one test case.

    A harness holding the sample's program (`source`, rewritten by
    `rewrite_with_print`) and the test case's expected output: it runs the
    program as the MTPB executor does (`run_test_case`), compares what it
    printed last (`equivalent`), and writes the verdict as its last line of
    standard output, `MTPB-RESULT {"task_id", "test_case", "passed",
    "reason", "output"}`, which `check_output` reads. It exits 0 whatever the
    verdict; one that does not reach that line (killed by a sandbox limit)
    has no verdict.
    """
    code = rewrite_with_print(source(problem, completions, test_case_index))
    expected = json.dumps(problem.outputs[test_case_index])
    header = {"task_id": problem.id, "test_case": test_case_index}
    return "\n".join(
        [
            f'"""MTPB problem {problem.id}, test case {test_case_index}: runs the program, checks what it printed last."""',
            "from __future__ import annotations",
            "",
            "import json",
            "import os",
            "",
            inspect.getsource(equivalent),
            inspect.getsource(run_test_case),
            f"CODE = {code!r}",
            f"EXPECTED = json.loads({expected!r})",
            f"report = {{**{header!r}, **run_test_case(CODE, EXPECTED, {float(time_limit_s)!r})}}",
            f'os.write(1, ("\\n" + {RESULT_MARKER!r} + json.dumps(report) + "\\n").encode())',
            "",
        ]
    )


def read_report(stdout: str) -> Optional[dict]:
    """The verdict a harness written by `program` left on its stdout (its last `MTPB-RESULT` line), or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                report = json.loads(line[len(RESULT_MARKER) :])
            except json.JSONDecodeError:
                return None
            return report if isinstance(report, dict) and isinstance(report.get("passed"), bool) else None
    return None


def check_output(problem: MtpbProblem, test_case_index: int, result_stdout: str) -> bool:
    """Whether a test case passed, from the stdout of the program `program` wrote for it.

    The comparison itself (`equivalent`) ran inside the sandbox, on the
    printed object; this reads its verdict. False when there is none.
    Raises ValueError when the stdout is the verdict on another problem or
    test case.
    """
    _check_test_case(problem, test_case_index)
    report = read_report(result_stdout)
    if report is None:
        return False
    if (report.get("task_id"), report.get("test_case")) != (problem.id, test_case_index):
        raise ValueError(
            f"result_stdout: the verdict on problem {report.get('task_id')} test case {report.get('test_case')}, "
            f"not on problem {problem.id} test case {test_case_index}"
        )
    return report["passed"]


def default_limits() -> SandboxLimits:
    """Sandbox limits that let a program run the executor's 20 s (and start up) before the sandbox stops it."""
    from fastcodegen.eval.sandbox import SandboxLimits

    limit = EXEC_TIME_LIMIT_S + SANDBOX_MARGIN_S
    return replace(SandboxLimits(), timeout_s=limit, cpu_s=int(limit))


def _sample_key(i: int, sample: Any, by_id: Mapping[str, MtpbProblem]) -> tuple[MtpbProblem, int, int, list[str]]:
    where = f"samples[{i}]"
    if not isinstance(sample, Mapping):
        raise ValueError(f"{where}: a sample is a mapping with task_id, test_case, sample_index, completions")
    missing = [k for k in ("task_id", "test_case", "sample_index", "completions") if k not in sample]
    if missing:
        hint = (
            " (MTPB samples each test case separately: its inputs are in the prompts)" if "test_case" in missing else ""
        )
        raise ValueError(f"{where}: missing {', '.join(missing)}{hint}")
    tid, test_case = sample["task_id"], sample["test_case"]
    if isinstance(tid, bool) or not isinstance(tid, (str, int)) or str(tid) not in by_id:
        raise ValueError(f"{where}.task_id: {tid!r} is not one of the problems scored")
    tid = str(tid)
    problem = by_id[tid]
    index = sample["sample_index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"{where}.sample_index: a non-negative integer, got {index!r}")
    try:
        _check_test_case(problem, test_case)
    except ValueError as e:
        raise ValueError(f"{where}.test_case: {str(e).split(': ', 1)[1]}") from None
    completions = sample["completions"]
    _check_completions(f"{where}.completions", completions)
    if len(completions) != problem.n_turns:
        raise ValueError(
            f"{where}.completions: problem {problem.id} has {problem.n_turns} turns, got {len(completions)} completions"
        )
    return problem, test_case, index, list(completions)


def score(
    problems: Sequence[MtpbProblem],
    samples: Sequence[Mapping[str, Any]],
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    progress: bool = False,
) -> list[MtpbResult]:
    """Runs every sample's program in the sandbox and returns one MtpbResult per sample, in order.

    A sample is {"task_id": problem id, "test_case": 0-4, "sample_index": i,
    "completions": [one per turn]}, the completions generated from
    `turn_prompt` with that test case's inputs (`fastcodegen.eval.harness`
    records MTPB samples so). `limits` defaults to
    `default_limits()`. Raises ValueError for a malformed sample, a task_id
    not among `problems`, or two samples with the same (task_id, test_case,
    sample_index).
    """
    from fastcodegen.eval.sandbox import run_programs

    by_id = {p.id: p for p in problems}
    keys, programs, seen = [], [], set()
    for i, sample in enumerate(samples):
        problem, test_case, index, completions = _sample_key(i, sample, by_id)
        if (problem.id, test_case, index) in seen:
            raise ValueError(f"samples[{i}]: a second sample {index} of problem {problem.id} test case {test_case}")
        seen.add((problem.id, test_case, index))
        keys.append((problem, test_case, index))
        programs.append(program(problem, completions, test_case))
    executions = run_programs(
        programs, limits if limits is not None else default_limits(), workers=workers, progress=progress
    )
    results = []
    for (problem, test_case, index), execution in zip(keys, executions):
        report = read_report(execution.stdout)
        if report is None:
            passed, reason, output = False, f"the program gave no verdict: {execution.reason}", None
        else:
            passed = check_output(problem, test_case, execution.stdout)
            reason, output = report.get("reason", ""), report.get("output")
        results.append(MtpbResult(problem.id, test_case, index, passed, reason, output, execution.duration_s))
    return results


def summary(results: Sequence[MtpbResult], problems: Sequence[MtpbProblem]) -> dict:
    """The pass rate as the paper reports it, overall and per category.

    A problem's pass rate is the fraction of its programs (test cases x
    samples) that pass; the overall pass rate is the mean of the problems'
    pass rates, and a category's the mean over its problems. Also the
    executor's raw counts: programs run and passed. Raises ValueError when a
    result is for a problem not in `problems`, or a problem has no results.
    """
    by_id = {p.id: p for p in problems}
    counts: dict[str, list[int]] = {p.id: [0, 0] for p in problems}
    for r in results:
        if r.task_id not in by_id:
            raise ValueError(f"results: a result for problem {r.task_id!r}, which is not in problems")
        counts[r.task_id][0] += bool(r.passed)
        counts[r.task_id][1] += 1
    empty = [pid for pid, (_, n) in counts.items() if n == 0]
    if empty:
        raise ValueError(f"problems: no results for problem(s) {', '.join(empty)}; pass only the problems scored")
    per_problem = {
        pid: {"category": by_id[pid].category, "programs": n, "passed": c, "pass_rate": c / n}
        for pid, (c, n) in counts.items()
    }
    by_category: dict[str, list[float]] = defaultdict(list)
    for row in per_problem.values():
        by_category[row["category"]].append(row["pass_rate"])
    rates = [row["pass_rate"] for row in per_problem.values()]
    return {
        "pass_rate": sum(rates) / len(rates) if rates else 0.0,
        "problems": len(per_problem),
        "programs": sum(n for _, n in counts.values()),
        "programs_passed": sum(c for c, _ in counts.values()),
        "categories": {
            cat: {"problems": len(r), "pass_rate": sum(r) / len(r)} for cat, r in sorted(by_category.items())
        },
        "per_problem": per_problem,
    }

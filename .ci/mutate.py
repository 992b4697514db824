#!/usr/bin/env python3
"""Mutation testing of one module: can its tests fail when its logic is broken?

    .venv/bin/python .ci/mutate.py evolink_provider/ledger.py [--sample 30] [--seed 1] [--timeout 300]
        [--tests "tests/test_x.py -k y"] [--lines 12,40] [--list]

Each mutant changes one node on one line of the module: a comparison, boolean or arithmetic operator
swapped, a number or True/False changed, a condition negated, a ``return`` made to return None, a
one-line statement of a function removed (``pass``). Text is never mutated (strings, f-strings, every
call that logs or prints: ``log.*``, ``self.log.*``, ``log_once``, ``warnings.warn``), nor docstrings
or decorators. Each mutant
is written into the module in place, the module's test selection (``SELECTION`` below, or ``--tests``) runs
with ``-x`` under a timeout, and the file is restored; a failing, erroring or timed-out run *kills* the
mutant. Run it on a clean work tree, under the heavy-run lock: ``flock /tmp/evolink-heavy.lock ...``;
stop it with Ctrl-C (SIGINT), which restores the module.

It prints each surviving mutant (line, change, source line) and the score. ``--sample N`` runs a fixed,
seeded subset of N mutants (the same N for the same seed and module), for modules whose full set is too
slow; ``--lines`` keeps only the mutants (of the sample, if any) on those lines, to re-run a run's survivors
after tests were added; ``--list`` prints the mutants without running anything.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The fast tests that guard each module (pytest arguments). A module not listed needs ``--tests``.
SELECTION: dict[str, str] = {
    "evolink_provider/submission.py": (
        "tests/test_deferral.py tests/test_operators.py -k 'test_deferral or cleared_completed or "
        "reattach_never or (retry_reattaches and sync) or transient or min_credits_refuses'"
    ),
    "evolink_provider/ledger.py": "tests/test_ledger.py",
    "evolink_provider/records.py": "tests/test_ledger.py",
    "evolink_provider/storage.py": "tests/test_storage.py",
    "evolink_provider/polling.py": "tests/test_polling.py tests/test_trigger.py",
}

#: Calls whose arguments are text for people: logging and messages are not mutated.
TEXT_CALLS = re.compile(r"(^|\.)(log|logger|_log)\.\w+$|^(warnings\.warn|log_once|print)$")

SWAPS: dict[type[ast.AST], type[ast.AST]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.And: ast.Or,
    ast.Or: ast.And,
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
}


@dataclass(frozen=True)
class Mutant:
    line: int
    start: int  # character offsets of the replaced segment in the source
    end: int
    replacement: str
    change: str

    def apply(self, source: str) -> str:
        return source[: self.start] + self.replacement + source[self.end :]


def _offsets(source: str) -> list[int]:
    starts, total = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(total)
        total += len(line)
    return starts


def _call_name(node: ast.Call) -> str:
    try:
        return ast.unparse(node.func)
    except Exception:  # an odd callee is simply not a text call
        return ""


def _text_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside a logging or message call, a raise's message, or a docstring."""
    skip: set[int] = set()

    def mark(node: ast.AST) -> None:
        skip.update(id(inner) for inner in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for decorator in node.decorator_list:
                mark(decorator)  # @dataclass(frozen=True) and the like: not logic
        text_call = isinstance(node, ast.Call) and TEXT_CALLS.search(_call_name(node))
        if text_call or isinstance(node, ast.JoinedStr):
            mark(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            mark(node)  # a docstring or a bare string
    return skip


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    starts = _offsets(source)
    skip = _text_nodes(tree)
    found: list[Mutant] = []

    def segment(node: ast.AST) -> tuple[int, int] | None:
        lineno, end_lineno = getattr(node, "lineno", None), getattr(node, "end_lineno", None)
        if lineno is None or lineno != end_lineno:
            return None  # single-line mutants only
        return starts[lineno - 1] + node.col_offset, starts[lineno - 1] + node.end_col_offset  # type: ignore[attr-defined]

    def add(node: ast.AST, replacement: ast.AST | str, change: str) -> None:
        where = segment(node)
        if where is None or id(node) in skip:
            return
        text = replacement if isinstance(replacement, str) else ast.unparse(replacement)
        found.append(Mutant(node.lineno, where[0], where[1], text, change))  # type: ignore[attr-defined]

    def swapped(node: ast.AST, field: str, index: int | None = None) -> ast.AST | None:
        op = getattr(node, field) if index is None else getattr(node, field)[index]
        new = SWAPS.get(type(op))
        if new is None:
            return None
        copy = ast.parse(ast.unparse(node), mode="eval").body
        if index is None:
            setattr(copy, field, new())
        else:
            getattr(copy, field)[index] = new()
        return copy

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if (new := swapped(node, "ops", i)) is not None:
                    add(node, new, f"{type(op).__name__} -> {type(new.ops[i]).__name__}")  # type: ignore[attr-defined]
        elif isinstance(node, (ast.BoolOp, ast.BinOp)):
            if (new := swapped(node, "op")) is not None:
                add(node, new, f"{type(node.op).__name__} -> {type(new.op).__name__}")  # type: ignore[attr-defined]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            add(node, f"({ast.unparse(node.operand)})", "not removed")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)):
            if isinstance(node.value, bool):
                add(node, repr(not node.value), f"{node.value} -> {not node.value}")
            elif isinstance(node.value, (int, float)):
                value = node.value + 1 if node.value == 0 else node.value * 2 if node.value > 1 else 0
                add(node, repr(type(node.value)(value)), f"{node.value!r} -> {value!r}")
        if isinstance(node, (ast.If, ast.While)) and segment(node.test) is not None:
            add(node.test, f"not ({ast.unparse(node.test)})", "condition negated")
        returns_none = isinstance(node, ast.Return) and (
            node.value is None or (isinstance(node.value, ast.Constant) and node.value.value is None)
        )
        if isinstance(node, ast.Return) and not returns_none:
            add(node, "return None", "returns None")
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue  # removing a module-level name only makes an import fail: no news
        for node in ast.walk(function):
            logs = isinstance(node, ast.Expr) and id(node.value) in skip  # a log call as a statement
            if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.Raise)) and not logs:
                add(node, "pass", "statement removed")
    unique = {(m.start, m.end, m.replacement): m for m in found}
    return sorted(unique.values(), key=lambda m: (m.line, m.start, m.change))


def run_tests(selection: str, timeout: float) -> str:
    """``passed``, ``failed`` (or error) or ``timeout``: one pytest run of the selection."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *shlex.split(selection)]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    except BaseException:  # interrupted (Ctrl-C): stop the run too, then restore the module
        os.killpg(process.pid, signal.SIGKILL)
        raise
    if code == 5:
        raise SystemExit(f"the selection collects no test: {selection}")
    return "passed" if code == 0 else "failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="path of the module to mutate, e.g. evolink_provider/resume.py")
    parser.add_argument("--tests", help="pytest arguments (default: the module's SELECTION)")
    parser.add_argument("--sample", type=int, default=0, help="run a seeded subset of this many mutants")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lines", help="comma-separated line numbers: run only the mutants on these lines")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run (default: 300)")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    args = parser.parse_args()

    path = (REPO / args.module).resolve()
    module = path.relative_to(REPO).as_posix()
    selection = args.tests or SELECTION.get(module)
    if selection is None:
        raise SystemExit(f"no test selection for {module}: pass --tests")
    original = path.read_text(encoding="utf-8")
    every = mutants(original)
    chosen = every
    if args.sample and args.sample < len(every):
        chosen = sorted(random.Random(args.seed).sample(every, args.sample), key=lambda m: (m.line, m.start))
    if args.lines:
        wanted = {int(line) for line in args.lines.split(",")}
        chosen = [mutant for mutant in chosen if mutant.line in wanted]
        if not chosen:  # a score of "0 of 0" would read as a pass
            raise SystemExit(
                f"--lines {args.lines} matches no mutant of {module} (of the sample, if any): have the lines "
                "moved since the command was written? Run it on the commit it names."
            )
    lines = original.splitlines()
    print(f"{module}: {len(every)} mutants, running {len(chosen)}; tests: {selection}", flush=True)
    if args.list:
        for mutant in chosen:
            print(f"  L{mutant.line}: {mutant.change}: {lines[mutant.line - 1].strip()}")
        return
    began = time.monotonic()
    if run_tests(selection, args.timeout) != "passed":
        raise SystemExit("the selection fails on the unmutated module: fix that first")
    survivors: list[Mutant] = []
    try:
        for number, mutant in enumerate(chosen, 1):
            path.write_text(mutant.apply(original), encoding="utf-8")
            try:
                compile(mutant.apply(original), module, "exec")
            except SyntaxError:
                outcome = "failed"  # cannot happen for these mutants; counted as killed if it does
            else:
                outcome = run_tests(selection, args.timeout)
            if outcome == "passed":
                survivors.append(mutant)
            print(f"[{number}/{len(chosen)}] L{mutant.line} {mutant.change}: {outcome}", flush=True)
    finally:
        path.write_text(original, encoding="utf-8")
    killed = len(chosen) - len(survivors)
    print(f"\nsurvived ({len(survivors)}):")
    for mutant in survivors:
        print(f"  L{mutant.line}: {mutant.change}: {lines[mutant.line - 1].strip()}")
    score = 100.0 * killed / len(chosen) if chosen else 100.0
    print(
        f"\n{module}: killed {killed} of {len(chosen)} ({score:.0f} %)"
        + (f", of a seeded sample (seed {args.seed}, {args.sample})" if 0 < args.sample < len(every) else "")
        + (f", on lines {args.lines}" if args.lines else "")
        + f"; {len(every)} mutants in all"
        + f", in {time.monotonic() - began:.0f} s"
    )


if __name__ == "__main__":
    main()

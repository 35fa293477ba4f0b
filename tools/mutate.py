"""Mutation testing for the modules where a silent bug costs most: plant one small bug at a time in
a copy of the package and run only the tests that cover that module; a mutant the tests pass is a
survivor, to be killed by a new test or explained (an equivalent mutant).

    python tools/mutate.py engine/scheduler.py --list             # the mutants, nothing run
    python tools/mutate.py engine/scheduler.py parallel/low_latency.py --max 40
    python tools/mutate.py engine/sampling.py --lines 40-60,85 --tests 'tests/test_sampling.py -k seed'
    python tools/mutate.py --all --max 30

Mutants, each alone: a comparison flipped (`<` <-> `<=`, `>` <-> `>=`, `==` <-> `!=`, `in` <->
`not in`, `is` <-> `is not`), `and` <-> `or`, an integer constant off by one (n + 1 and n - 1; not
defaults, module constants or numbers in error messages: settings, not logic), and a statement
dropped (a call, an augmented assignment, an assignment to an attribute or item:
replaced by `pass`). Each runs `pytest -x` on the module's tests with the mutated copy first on
PYTHONPATH (forked and spawned ranks import it too). A mutant that runs past the per-mutant
timeout (default: 3x the unmutated run plus 20 s) is killed and counted apart, as timed out (a
hang is a failure, but a slow machine can cause one too). `--max N` tries a sample of N, the same
N for the same `--seed`. The summary is a table per module (tried, killed, survived, timed out)
and the survivors as file:line:column, the mutation and the line's source. Exit status: 1 with
survivors, 0 without. Not in CI: a module takes minutes on 2 cores. Run it before closing an issue
that touches one of these modules, and list its survivors in the closing note.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch  # noqa: F401  imported once, before the forks (see run_tests)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "expertmesh"
# module (under expertmesh/) -> the pytest arguments of the tests that cover it
COVERING = {
    "parallel/dispatch.py": ["tests/test_dispatch.py", "tests/test_dispatch_edges.py"],
    # and the pretend device of test_host_syncs: the only place where a host table left behind shows
    "parallel/low_latency.py": ["tests/test_dispatch.py", "tests/test_host_syncs.py", "-k", "latency"],
    "engine/scheduler.py": ["tests/test_scheduler.py"],
    "engine/block_pool.py": ["tests/test_block_pool.py", "tests/test_dp_routing.py", "tests/test_scheduler.py"],
    "engine/dp_routing.py": ["tests/test_dp_routing.py"],
    "engine/sampling.py": ["tests/test_sampling_edges.py", "tests/test_sampling.py"],
    "model/paged.py": ["tests/test_paged_plan.py", "tests/test_paged.py", "tests/test_mla_prefill.py"],
    "model/attn_backends/torch_paged.py": ["tests/test_paged_plan.py", "tests/test_paged.py", "tests/test_graphs.py"],
    # the unit tests against the naive reference (the deployment runs take minutes per mutant)
    "model/capacity.py": ["tests/test_capacity_counts.py", "tests/test_load_balance.py",
                          "-k", "capacity_counts or accounts or never_exceeds"],
    "server/protocol.py": ["tests/test_protocol.py", "tests/test_server.py"],
}
FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
         ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
          ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}


@dataclass(frozen=True)
class Mutant:
    """The `index`-th node of `ast.walk` over the module, changed as `what` says, at `line`:`col`
    (col counted from 1, as editors do)."""

    index: int
    line: int
    col: int
    what: str
    change: str  # "flip:<op position>", "boolop", "plus", "minus", "drop"


def _docstring(node: ast.AST, parents: dict) -> bool:
    parent = parents.get(node)
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str) and parent is not None
            and getattr(parent, "body", [None])[0] is node)


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for index, node in enumerate(ast.walk(tree)):
        line, col = getattr(node, "lineno", 0), getattr(node, "col_offset", -1) + 1
        if isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in FLIPS:
                    which = f" (comparison {j + 1} of {len(node.ops)})" if len(node.ops) > 1 else ""
                    out.append(Mutant(index, line, col, f"{SYMBOL[type(op)]} -> {SYMBOL[FLIPS[type(op)]]}{which}",
                                      f"flip:{j}"))
        elif isinstance(node, ast.BoolOp):
            out.append(Mutant(index, line, col, "and -> or" if isinstance(node.op, ast.And) else "or -> and", "boolop"))
        elif isinstance(node, ast.Constant) and type(node.value) is int and not _setting(node, parents):
            out.append(Mutant(index, line, col, f"{node.value} -> {node.value + 1}", "plus"))
            out.append(Mutant(index, line, col, f"{node.value} -> {node.value - 1}", "minus"))
        elif _droppable(node) and not _docstring(node, parents):
            out.append(Mutant(index, line, col, f"drop `{ast.unparse(node).splitlines()[0][:60]}`", "drop"))
    return out


def _setting(node: ast.AST, parents: dict) -> bool:
    """A default or a module constant (a tuned setting, not logic: its tests pass values of their
    own), or a number in an error message."""
    parent = parents.get(node)
    if isinstance(parent, ast.arguments) or isinstance(parent, ast.AnnAssign):
        return True
    while parent is not None:
        if isinstance(parent, (ast.JoinedStr, ast.Raise)):
            return True
        if isinstance(parent, ast.Assign) and isinstance(parents.get(parent), ast.Module):
            return True
        parent = parents.get(parent)
    return False


def _droppable(node: ast.AST) -> bool:
    if isinstance(node, (ast.Expr, ast.AugAssign)):
        return True
    return isinstance(node, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)


class _Apply(ast.NodeTransformer):
    def __init__(self, mutant: Mutant, order: dict[int, int]):
        self.mutant, self.order = mutant, order

    def visit(self, node):
        if self.order.get(id(node)) != self.mutant.index:
            return self.generic_visit(node)
        change = self.mutant.change
        if change.startswith("flip:"):
            j = int(change.split(":")[1])
            node.ops[j] = FLIPS[type(node.ops[j])]()
        elif change == "boolop":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif change in ("plus", "minus"):
            node.value += 1 if change == "plus" else -1
        else:
            return ast.copy_location(ast.Pass(), node)
        return node


def mutated(source: str, mutant: Mutant) -> str:
    tree = ast.parse(source)
    order = {id(node): i for i, node in enumerate(ast.walk(tree))}  # numbered before any change
    return ast.unparse(ast.fix_missing_locations(_Apply(mutant, order).visit(tree)))


def _copy_path(copy_root: Path) -> str:
    return os.pathsep.join([str(copy_root), os.environ.get("PYTHONPATH", "")])


def run_tests(copy_root: Path, args: list[str], timeout: float) -> str:
    """'passed', 'failed' or 'timeout' for the covering tests against the package in copy_root.

    pytest runs in a forked child of this process, which has imported torch and pytest but not
    the package (a fresh interpreter per mutant spent more time importing torch than testing):
    the child imports the package from copy_root, first on sys.path and on PYTHONPATH (for the
    ranks the tests spawn), and runs in a session of its own, killed whole on a timeout."""
    args = [str(ROOT / a) if a.startswith("tests/") else a for a in args]
    pid = os.fork()
    if pid == 0:
        code = 3  # pytest's "internal error", should the child fail before it runs
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(copy_root)
            os.environ["PYTHONPATH"] = _copy_path(copy_root)
            sys.path.insert(0, str(copy_root))
            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *args]))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def chosen(source: str, lines: set[int] | None, limit: int | None, seed: int) -> list[Mutant]:
    """The mutants of `source` on `lines` (all lines when None); a sample of `limit` of them,
    drawn with `seed` and kept in source order, when there are more."""
    found = [m for m in mutants(source) if lines is None or m.line in lines]
    if limit is not None and limit < len(found):
        found = sorted(random.Random(seed).sample(found, limit), key=lambda m: m.index)
    return sorted(found, key=lambda m: (m.line, m.index))


def mutate_module(module: str, tests: list[str], found: list[Mutant],
                  timeout: float | None) -> list[tuple[Mutant, str]]:
    """Each of `found`, planted alone in a copy of the package -> 'passed' (a survivor), 'failed'
    or 'timeout' for `tests`; prints as it goes."""
    source = (ROOT / PACKAGE / module).read_text()
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        copy_root = Path(tmp)
        shutil.copytree(ROOT / PACKAGE, copy_root / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        target = copy_root / PACKAGE / module
        if PACKAGE in sys.modules:
            raise SystemExit(f"{PACKAGE} is imported here already: the forked tests would not import the copy")
        t0 = time.perf_counter()
        baseline = run_tests(copy_root, tests, 3600)
        took = time.perf_counter() - t0
        if baseline != "passed":
            raise SystemExit(f"{module}: its tests do not pass unmutated ({baseline}); fix that first")
        limit = timeout if timeout is not None else 3 * took + 20
        print(f"{module}: tests pass unmutated in {took:.0f} s; {len(found)} mutants, "
              f"{limit:.0f} s each at most", flush=True)
        results = []
        for mutant in found:
            target.write_text(mutated(source, mutant))
            result = run_tests(copy_root, tests, limit)
            results.append((mutant, result))
            mark = "SURVIVED" if result == "passed" else result
            print(f"  {module}:{mutant.line}:{mutant.col}: {mutant.what}: {mark}", flush=True)
    return results


def _lines(text: str) -> set[int]:
    """'40-60,85' -> {40, ..., 60, 85}."""
    out = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("modules", nargs="*", help=f"paths under {PACKAGE}/: {', '.join(COVERING)}")
    parser.add_argument("--all", action="store_true", help="every module above")
    parser.add_argument("--max", type=int, default=None, metavar="N",
                        help="a sample of N mutants per module (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="which sample --max draws (default %(default)s)")
    parser.add_argument("--lines", type=_lines, default=None, metavar="A-B,C",
                        help="only the mutants on these lines (to check that a new test kills survivors)")
    parser.add_argument("--tests", type=shlex.split, default=None, metavar="ARGS",
                        help="pytest arguments instead of the module's covering tests, in one "
                             "string: --tests 'tests/test_sampling.py -k seed'")
    parser.add_argument("--list", action="store_true", help="print the mutants and run nothing")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant (default: 3x the unmutated run plus 20)")
    args = parser.parse_args(argv)
    modules = list(COVERING) if args.all else args.modules
    unknown = [m for m in modules if m not in COVERING]
    if unknown or not modules:
        parser.error(f"modules: some of {', '.join(COVERING)} (got {unknown or 'none'})")
    if args.max is not None and args.max < 1:
        parser.error("--max: at least 1")
    sources = {m: (ROOT / PACKAGE / m).read_text() for m in modules}
    found = {m: chosen(sources[m], args.lines, args.max, args.seed) for m in modules}
    if args.list:
        for module in modules:
            for m in found[module]:
                print(f"{PACKAGE}/{module}:{m.line}:{m.col}: {m.what}")
        return 0
    results = {m: mutate_module(m, args.tests or COVERING[m], found[m], args.timeout) for m in modules}
    print(f"\n{'module':<40} {'tried':>6} {'killed':>7} {'survived':>9} {'timed out':>10}")
    for module, rows in results.items():
        outcomes = [r for _, r in rows]
        print(f"{module:<40} {len(rows):>6} {outcomes.count('failed'):>7} "
              f"{outcomes.count('passed'):>9} {outcomes.count('timeout'):>10}")
    survivors = [(module, m) for module, rows in results.items() for m, r in rows if r == "passed"]
    print(f"\n{len(survivors)} survivors" + (":" if survivors else ""))
    for module, m in survivors:
        text = sources[module].splitlines()[m.line - 1].strip()
        print(f"  {PACKAGE}/{module}:{m.line}:{m.col}: {m.what}    | {text}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())

"""tools/mutate.py plants exactly the mutants its docstring lists, each alone, and samples and
selects them as its flags say; the mutated sources are written out here by hand."""

import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("mutate", Path(__file__).parents[1] / "tools" / "mutate.py")
mutate = sys.modules["mutate"] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up there
SPEC.loader.exec_module(mutate)

SOURCE = '''LIMIT = 5


def f(a, b=3):
    """Docs."""
    x.y = a < 2 and b
    g(a)
    n = 0
    n += 1
    if a in b:
        raise ValueError(f"over {7}")
    return n
'''

# mutation -> the changed line (every other line as in SOURCE, as ast.unparse writes it)
WANT = {
    "< -> <=": "    x.y = a <= 2 and b",
    "and -> or": "    x.y = a < 2 or b",
    "2 -> 3": "    x.y = a < 3 and b",
    "2 -> 1": "    x.y = a < 1 and b",
    "drop `x.y = a < 2 and b`": "    pass",
    "drop `g(a)`": "    pass",
    "0 -> 1": "    n = 1",
    "0 -> -1": "    n = -1",
    "drop `n += 1`": "    pass",
    "1 -> 2": "    n += 2",
    "1 -> 0": "    n += 0",
    "in -> not in": "    if a not in b:",
}


def test_the_mutants_are_the_documented_kinds_and_spare_settings_and_messages():
    # not LIMIT (a module constant), not b=3 (a default), not 7 (in an error message), not the
    # docstring, not `n = 0` as a statement (an assignment to a name is not dropped)
    assert sorted(m.what for m in mutate.mutants(SOURCE)) == sorted(WANT)


def test_each_mutant_changes_its_one_line_alone():
    plain = mutate.ast.unparse(mutate.ast.parse(SOURCE)).splitlines()
    for m in mutate.mutants(SOURCE):
        lines = mutate.mutated(SOURCE, m).splitlines()
        changed = [i for i, (a, b) in enumerate(zip(plain, lines)) if a != b]
        assert len(lines) == len(plain) and len(changed) == 1, m
        assert lines[changed[0]] == WANT[m.what]
        assert SOURCE.splitlines()[m.line - 1].strip().startswith(plain[changed[0]].strip()[:4])


def test_max_draws_the_same_sample_for_a_seed_in_source_order_and_lines_select():
    every = mutate.chosen(SOURCE, None, None, 0)
    sample = mutate.chosen(SOURCE, None, 5, 0)
    assert len(sample) == 5 and set(sample) <= set(every)
    assert sample == mutate.chosen(SOURCE, None, 5, 0)
    assert [(m.line, m.index) for m in sample] == sorted((m.line, m.index) for m in sample)
    assert {frozenset(mutate.chosen(SOURCE, None, 5, seed)) for seed in range(20)} != {frozenset(sample)}
    assert mutate.chosen(SOURCE, None, 100, 0) == every
    assert {m.line for m in mutate.chosen(SOURCE, mutate._lines("7-9"), None, 0)} == {7, 8, 9}
    assert mutate._lines("3-5,9") == {3, 4, 5, 9}


@pytest.mark.parametrize("argv", [["nowhere.py"], [], ["engine/sampling.py", "--max", "0"]])
def test_bad_arguments_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        mutate.main(argv)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_list_prints_the_mutants_and_runs_nothing(capsys):
    assert mutate.main(["engine/sampling.py", "--list", "--lines", "68"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and all(line.startswith("expertmesh/engine/sampling.py:68:") for line in out)

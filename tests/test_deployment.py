"""Deployment strings and their validation against a model and a world size."""

import pytest

from expertmesh.config import preset
from expertmesh.deployment import Deployment

TINY = preset("tiny")


@pytest.mark.parametrize("text, sizes", [
    ("single", (1, 1, 1)), ("ep16", (16, 1, 1)), ("tp8pp2", (1, 8, 2)), ("pp2tp8", (1, 8, 2)),
    ("ep8pp2", (8, 1, 2)), ("tp2", (1, 2, 1)), (" EP4 ", (4, 1, 1)), ("ep1", (1, 1, 1)),
])
def test_parse_reads_axes_in_any_order(text, sizes):
    d = Deployment.parse(text)
    assert (d.ep, d.tp, d.pp) == sizes
    assert Deployment.parse(d.name) == d


@pytest.mark.parametrize("text, fragment", [
    ("", "cannot parse"), ("ep", "cannot parse"), ("ep4x", "cannot parse"), ("dp2", "cannot parse"),
    ("ep2ep2", "names an axis twice"), ("ep0", "positive"), ("ep2tp2", "not supported"),
])
def test_parse_rejects_malformed_strings_with_the_fix(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        Deployment.parse(text)


@pytest.mark.parametrize("text, world, fragment", [
    ("tp8pp2", 8, "needs 16 ranks but the world size is 8"),
    ("ep3", None, "ep=3 must divide the 16 experts of tiny; use one of 1, 2, 4, 8, 16"),
    ("tp16", None, "tp=16 must divide n_heads=8"),
    ("tp3", None, "use one of 1, 2, 4, 8"),
    ("pp5", None, "pp=5 exceeds the 4 layers of tiny; use at most pp4"),
])
def test_validate_names_the_wrong_number_and_what_fits(text, world, fragment):
    with pytest.raises(ValueError, match=fragment):
        Deployment.parse(text).validate(TINY, world)


def test_tp_must_divide_kv_heads_too():
    with pytest.raises(ValueError, match="n_kv_heads=2"):
        Deployment.parse("tp4").validate(preset("tiny", n_kv_heads=2))


def test_uneven_pipeline_stages_give_the_first_stages_one_more_layer():
    assert Deployment(pp=3).stage_layers(4) == [range(0, 2), range(2, 3), range(3, 4)]
    stages = Deployment(pp=2).stage_layers(16)
    assert [len(s) for s in stages] == [8, 8] and stages[1].start == 8


def test_rank_coordinates_and_sequence_ownership():
    d = Deployment.parse("ep4pp2")
    assert [d.coords(r) for r in (0, 3, 4, 7)] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    owned = [d.rows_of(r, 10) for r in range(4)]
    assert owned == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert d.rows_of(5, 10) == owned[1]  # pipeline peers own the same sequences
    assert [d.reports(r) for r in range(8)] == [False] * 4 + [True] * 4
    assert Deployment.parse("ep8").rows_of(7, 3) == []  # fewer sequences than ranks
    tp = Deployment.parse("tp2pp2")
    assert tp.rows_of(3, 5) == list(range(5)) and [tp.reports(r) for r in range(4)] == [False, False, True, False]

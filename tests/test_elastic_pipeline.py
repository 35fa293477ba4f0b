"""Elastic expert parallelism with pipeline stages: which rank serves which stage and which
pipeline (`elastic/layout.py`), against plain rules.
"""

import pytest

from expertmesh.deployment import Deployment
from expertmesh.elastic.layout import Layout, StageLost


def test_a_layout_loses_ranks_stage_by_stage_and_pairs_the_ith_survivors():
    layout = Layout.of(Deployment(ep=4, pp=2))
    assert layout.stages == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert layout.pipelines == [(0, 4), (1, 5), (2, 6), (3, 7)]
    after = layout.without({1, 6, 9})  # 9: no rank of this layout, ignored
    assert after.stages == ((0, 2, 3), (4, 5, 7))
    assert after.pipelines == [(0, 4), (2, 5), (3, 7)]
    assert after.members == [0, 2, 3, 4, 5, 7]
    small = Layout.of(Deployment(ep=2, pp=2)).without({1})
    assert small.pipelines == [(0, 2)] and small.stage_of(3) == 1  # 3 serves experts only
    assert small.describe() == "ep1 + ep2 (2 stages), 1 pipeline"
    assert Layout.of(Deployment(ep=4)).without({2}).describe() == "ep3"


def test_a_stage_with_no_rank_left_is_stage_lost_naming_its_last_ranks():
    with pytest.raises(StageLost, match=r"^rank 3 of pipeline stage 1 died and no rank of that stage is left$"):
        Layout(((0, 1), (3,))).without({3})
    with pytest.raises(StageLost, match=r"^ranks 2, 3 of pipeline stage 1 died"):
        Layout.of(Deployment(ep=2, pp=2)).without({2, 3})

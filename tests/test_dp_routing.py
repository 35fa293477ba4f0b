"""Rank 0's placement of requests on data-parallel ranks (engine/dp_routing.py): the load rule,
and the cache rule that weighs a cached prefix, in tokens, against queued tokens."""

import pytest

from expertmesh.engine.block_pool import chain_hashes, short
from expertmesh.engine.dp_routing import DpRouter
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import SchedulerStats

KEY = b"k" * 16
BS = 4


def stats(free, queued=0, tokens=0):
    return SchedulerStats(blocks_free=free, waiting=queued, queued_tokens=tokens)


def req(rid, prompt, max_tokens=1):
    return Request(rid, tuple(prompt), max_tokens)


def hashes(prompt):
    """What a rank's pool reports once it holds `prompt`'s full blocks (computed independently)."""
    from hashlib import blake2b
    out, parent = [], b""
    for i in range(len(prompt) // BS):
        data = parent + b"".join(t.to_bytes(8, "little") for t in prompt[i * BS:(i + 1) * BS])
        parent = blake2b(data, key=KEY, digest_size=16).digest()
        out.append(int.from_bytes(parent[:8], "little"))
    return out


def test_block_hashes_chain_over_every_earlier_token():
    prompt = list(range(12))
    assert [short(h) for h in chain_hashes(prompt, BS, KEY, [])] == hashes(prompt)
    assert hashes([9] + prompt[1:])[2] != hashes(prompt)[2]  # block 2 differs by its parent alone


@pytest.mark.parametrize("rule", ["cache", "load"])
def test_without_a_cached_prefix_the_most_free_blocks_then_the_shortest_queue_wins(rule):
    router = DpRouter(3, 1, KEY, rule)  # a block per token: a prompt of k tokens takes k blocks
    assert router.assign([req(0, [1, 2, 3])], [stats(5, 0), stats(9, 4), stats(9, 1)]) == [2]
    router = DpRouter(2, 1, KEY, "load")
    # equal ranks fill round-robin; a big prompt uses up its rank's lead
    assert router.assign([req(i, [i]) for i in range(4)], [stats(8), stats(8)]) == [0, 1, 0, 1]
    assert router.assign([req(0, range(6)), req(1, [7]), req(2, [8])], [stats(10), stats(8)]) == [0, 1, 1]


def test_a_request_goes_where_its_prefix_is_cached_unless_that_delays_it_past_a_step():
    prefix = list(range(100, 132))  # 8 blocks: 32 tokens saved where cached
    router = DpRouter(2, BS, KEY, "cache", slack=8)
    router.learn(1, hashes(prefix), [])
    assert router.assign([req(0, prefix + [1, 2])], [stats(50, tokens=10), stats(20, tokens=30)]) == [1]
    # work: 10 + 34 on rank 0 against 41 + 2 on rank 1, then 51 + 2, over the slack
    assert router.assign([req(1, prefix + [1, 2])], [stats(50, tokens=10), stats(20, tokens=41)]) == [1]
    assert router.assign([req(1, prefix + [1, 2])], [stats(50, tokens=10), stats(20, tokens=51)]) == [0]
    # no room on rank 1 for the 1 uncached block
    assert router.assign([req(2, prefix + [1, 2])], [stats(50, tokens=10), stats(0, tokens=0)]) == [0]
    # load-only routing ignores the cache
    load = DpRouter(2, BS, KEY, "load")
    load.learn(1, hashes(prefix), [])
    assert load.assign([req(3, prefix + [1, 2])], [stats(50, tokens=10), stats(20, tokens=30)]) == [0]


def test_a_request_leaves_its_prefix_for_a_rank_running_more_than_seq_slack_fewer_sequences():
    prefix = list(range(100, 132))  # 8 blocks cached on rank 1
    router = DpRouter(2, BS, KEY, "cache", slack=1000, seq_slack=3)
    router.learn(1, hashes(prefix), [])
    # rank 1 runs 3 more sequences than rank 0 (inclusive bound): it keeps the request
    assert router.assign([req(0, prefix + [1])], [stats(50, 0), stats(50, 3)]) == [1]
    # 4 more: past the bound, so the load rule places it on rank 0 although rank 1 caches its prefix
    assert router.assign([req(1, prefix + [1])], [stats(50, 0), stats(50, 4)]) == [0]
    # a burst sharing the prefix fills rank 1 up to the bound, then spills
    burst = [req(10 + i, prefix + [i]) for i in range(6)]
    assert DpRouter(2, BS, KEY, "cache", slack=1000, seq_slack=3).assign(burst, [stats(50), stats(50)]) \
        == [0, 0, 0, 0, 1, 1]
    # no rank passes both bounds (the fewest sequences on the rank with the most work): by load
    router = DpRouter(2, BS, KEY, "cache", slack=8, seq_slack=1)
    router.learn(1, hashes(prefix), [])
    assert router.assign([req(2, prefix + [1])], [stats(50, 0, tokens=100), stats(40, 5, tokens=0)]) == [0]


def test_a_whole_prompt_cached_still_needs_a_block_for_its_last_token():
    prompt = list(range(300, 308))  # exactly 2 blocks, both cached on rank 1
    # its last token is computed again, so only the first block counts: rank 1 needs one free block
    for free_on_1, placed in ((0, 0), (1, 1)):
        router = DpRouter(2, BS, KEY, "cache", slack=1000)
        router.learn(1, hashes(prompt), [])
        assert router.assign([req(0, prompt)], [stats(50, 3), stats(free_on_1, 0)]) == [placed]


def test_requests_sharing_a_new_prefix_in_one_step_land_together_and_evictions_are_learnt():
    prefix = list(range(200, 264))  # 16 blocks
    router = DpRouter(2, BS, KEY, "cache", slack=8)
    burst = [req(i, prefix + [i]) for i in range(4)] + [req(9, list(range(5)))]
    assert router.assign(burst, [stats(100), stats(100)]) == [0, 0, 0, 0, 1]
    router.learn(0, [], hashes(prefix))
    assert router.assign([req(5, prefix + [5])], [stats(100, tokens=20), stats(100, tokens=0)]) == [1]


def test_an_unknown_rule_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--dp-routing"):
        DpRouter(2, BS, KEY, "random")


def test_one_data_parallel_rank_takes_every_request_whatever_its_room():
    assert DpRouter(1, BS, KEY).assign([req(i, [i, 1]) for i in range(3)], [stats(0)]) == [0, 0, 0]


def test_each_choice_takes_its_blocks_and_queue_place_from_its_rank_before_the_next():
    # load rule, 4-block prompts: rank 0 leads by 4 blocks, then is level (the shorter queue wins)
    # or behind by one block
    load = DpRouter(2, BS, KEY, "load")
    two = [req(0, range(16)), req(1, range(16, 32))]
    assert load.assign(two, [stats(10), stats(6)]) == [0, 1]
    assert load.assign(two, [stats(10), stats(5)]) == [0, 0]
    # one block each: level free blocks after the first choice, so the queues decide
    one = [req(0, [1]), req(1, [2])]
    assert DpRouter(2, BS, KEY, "load").assign(one, [stats(9), stats(8)]) == [0, 1]
    assert DpRouter(2, BS, KEY, "load").assign(one, [stats(9, 0), stats(8, 1)]) == [0, 0]
    # cache rule, no prefix: the first request's tokens count on its rank, so the second, past
    # a step's budget (slack 8) there, goes to the other
    cache = DpRouter(2, BS, KEY, "cache", slack=8)
    assert cache.assign([req(0, range(20)), req(1, range(20, 40))], [stats(100), stats(50)]) == [0, 1]


def test_the_load_rule_goes_by_free_blocks_whatever_the_queued_tokens():
    assert DpRouter(2, BS, KEY, "load").assign([req(0, [1, 2])], [stats(10, tokens=1000), stats(5)]) == [0]


def test_room_and_the_step_budget_are_inclusive():
    prefix = list(range(100, 132))  # 8 blocks cached on rank 1; the request needs 1 more there
    router = DpRouter(2, BS, KEY, "cache", slack=8)
    router.learn(1, hashes(prefix), [])
    assert router.assign([req(0, prefix + [1, 2])], [stats(50, tokens=10), stats(1, tokens=0)]) == [1]
    # work: 10 + 34 on rank 0, 50 + 2 on rank 1: exactly a step's budget over the least
    assert router.assign([req(1, prefix + [1, 2])], [stats(50, tokens=10), stats(20, tokens=50)]) == [1]


def test_a_prefix_counts_only_its_leading_cached_blocks():
    assert DpRouter._hits(set(), [1, 2, 3]) == 0
    assert DpRouter._hits({1, 2}, [1, 2, 3]) == 2
    assert DpRouter._hits({2, 3}, [1, 2, 3]) == 0

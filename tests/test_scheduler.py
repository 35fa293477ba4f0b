"""The scheduler's decisions (engine/scheduler.py), without a model: token budget, cap on running
sequences, chunked prefill, FCFS admission by free blocks, preemption of the newest."""

import contextlib
import copy
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig, Scheduler


def plan(chosen):
    return [(seq.request.id, n) for seq, n in chosen]


def step(s: Scheduler, token: int = 7):
    chosen = s.schedule()
    s.finish(chosen, {seq.request.id: token for seq, n in chosen})
    return plan(chosen)


def test_prompts_are_chunked_to_the_token_budget_and_decodes_go_first():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=10), num_blocks=100)
    s.add(Request("a", (1,) * 3, max_tokens=5))
    s.add(Request("b", (1,) * 25, max_tokens=5))
    assert step(s) == [("a", 3), ("b", 7)]
    assert step(s) == [("a", 1), ("b", 9)]
    assert step(s) == [("a", 1), ("b", 9)]   # b's prompt is done: its first token is sampled
    assert step(s) == [("a", 1), ("b", 1)]


def test_without_chunking_a_prompt_waits_for_a_step_with_room_for_all_of_it():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=10, chunked_prefill=False), num_blocks=100)
    s.add(Request("a", (1,) * 6, max_tokens=5))
    s.add(Request("b", (1,) * 6, max_tokens=5))
    assert step(s) == [("a", 6)]
    assert step(s) == [("a", 1), ("b", 6)]


def test_admission_is_fcfs_by_free_blocks_and_capped_by_max_seqs():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=100, max_seqs=2), num_blocks=4)
    s.add(Request("big", (1,) * 12, max_tokens=2))   # 3 blocks
    s.add(Request("mid", (1,) * 8, max_tokens=2))    # 2 blocks: does not fit beside big
    s.add(Request("tiny", (1,), max_tokens=2))       # would fit, but may not overtake mid
    assert step(s) == [("big", 12)]
    assert s.stats().waiting == 2 and s.stats().blocks_free == 1
    assert step(s) == [("big", 1)]                   # big finishes: its blocks come back
    assert step(s) == [("mid", 8), ("tiny", 1)]
    s.add(Request("late", (1,), max_tokens=1))
    assert ("late", 1) not in step(s)                # two running already


def test_the_newest_running_sequence_is_preempted_and_recomputed_later():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=2, max_batched_tokens=100), num_blocks=4)
    s.add(Request("old", (1, 2, 3), max_tokens=4))
    s.add(Request("new", (4, 5, 6), max_tokens=4))
    assert step(s) == [("old", 3), ("new", 3)]      # 2 blocks each, pool full
    assert step(s) == [("old", 1), ("new", 1)]      # position 3 still fits their blocks
    assert step(s) == [("old", 1)]                  # old needs a third block: new is preempted
    assert s.preemptions == 1 and s.waiting[0].request.id == "new"
    assert s.waiting[0].tokens == [4, 5, 6, 7, 7] and s.waiting[0].computed == 0
    while s.has_work:
        step(s)
    assert s.stats().blocks_free == 4



@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 6), blocks=st.integers(4, 40), budget=st.integers(1, 24),
       max_seqs=st.integers(1, 6), chunked=st.booleans(), seed=st.integers(0, 2**16))
def test_a_decode_bound_is_exactly_what_the_next_step_schedules(block_size, blocks, budget, max_seqs,
                                                                chunked, seed):
    """Whenever `decode_tokens` gives a number, the next `schedule()` (no arrival before it) runs
    exactly that many sequences, one token each, or fewer after an abort. Random streams of
    arrivals, aborts, prompts and lengths, with pools small enough to preempt."""
    rng = random.Random(seed)
    s = Scheduler(EngineConfig(block_size=block_size, max_batched_tokens=budget, max_seqs=max_seqs,
                               chunked_prefill=chunked), num_blocks=blocks)
    for i in range(40):
        bound = s.decode_tokens()
        if rng.random() < 0.3:  # an arrival: the engine sends no bound for this step
            request = Request(i, (1,) * rng.randint(1, 12), max_tokens=rng.randint(1, 6))
            with contextlib.suppress(ValueError):  # one the pool could never hold
                s.check(request)
                s.add(request)
                bound = None
        aborted = bool(s.running) and rng.random() < 0.1
        if aborted:
            s.abort(rng.choice(s.running).request.id)
        chosen = s.schedule()
        if bound is not None:
            assert all(n == 1 for _, n in chosen)
            assert len(chosen) <= bound if aborted else len(chosen) == bound
        s.finish(chosen, {seq.request.id: 7 for seq, n in chosen})


def test_a_decode_bound_is_given_only_when_the_next_step_can_only_decode():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=8, chunked_prefill=False), num_blocks=3)
    assert s.decode_tokens() == 0     # idle
    s.add(Request("a", (1,) * 3, max_tokens=6))
    s.add(Request("b", (1,) * 3, max_tokens=6))
    assert s.decode_tokens() is None  # prompts waiting
    assert step(s) == [("a", 3), ("b", 3)]
    assert s.decode_tokens() == 2     # their next tokens fit the blocks they hold
    assert step(s) == [("a", 1), ("b", 1)]
    assert s.decode_tokens() is None  # each needs a new block, one is free: a preemption
    s.abort("b")
    assert s.decode_tokens() == 1


def test_a_preempted_sequence_goes_back_ahead_of_every_newer_waiting_one():
    """The README: preempted sequences are requeued in arrival order."""
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=2, max_batched_tokens=100, max_seqs=2), num_blocks=4)
    s.add(Request("old", (1, 2, 3), max_tokens=4))
    s.add(Request("new", (4, 5, 6), max_tokens=4))
    s.add(Request("late", (1,), max_tokens=1))      # waits: two running already
    step(s)
    step(s)
    assert step(s) == [("old", 1)]                  # new is preempted while late waits
    assert [seq.request.id for seq in s.waiting] == ["new", "late"]


def blocks_held(s: Scheduler) -> list[int]:
    return [b for seq in [*s.running, *s.waiting] for b in seq.blocks]


def can_only_decode(s: Scheduler) -> bool:
    """Whether the next `schedule()` (no arrival, no abort) will decode one token of every running
    sequence and nothing else, preempting none: found by running it on a copy."""
    twin = copy.deepcopy(s)
    chosen = twin.schedule()
    return (not s.waiting and twin.preemptions == s.preemptions and len(chosen) == len(s.running)
            and all(n == 1 and seq.pending == 1 for seq, n in chosen))


@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 6), blocks=st.integers(4, 40), budget=st.integers(1, 24),
       max_seqs=st.integers(1, 6), chunked=st.booleans(), seed=st.integers(0, 2**16))
# a pool exactly as large as the next decode step needs: the bound must be given (found by planting
# `>=` for `>` in `decode_tokens`, which costs an all-reduce per step and no test caught)
@example(block_size=1, blocks=6, budget=6, max_seqs=2, chunked=True, seed=0)
def test_every_step_keeps_arrival_order_and_every_block_and_bounds_every_decode_only_step(
        block_size, blocks, budget, max_seqs, chunked, seed):
    """Random streams of arrivals, aborts, prompts and lengths, with pools small enough to
    preempt. Every step runs at least one token per chosen sequence, within the budget and the
    cap on running sequences, the running ones oldest first, and preempts only sequences newer
    than every one it keeps. After every step: the waiting queue is in arrival order (preempted
    sequences included), free plus held blocks are the pool, each block once; and before every
    step that can only decode, `decode_tokens` gives a bound."""
    rng = random.Random(seed)
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=block_size, max_batched_tokens=budget, max_seqs=max_seqs,
                               chunked_prefill=chunked), num_blocks=blocks)
    decode_only = 0
    for i in range(40):
        if can_only_decode(s):
            decode_only += 1
            assert s.decode_tokens() == len(s.running)
        if rng.random() < 0.3:
            request = Request(i, (1,) * rng.randint(1, 12), max_tokens=rng.randint(1, 6))
            with contextlib.suppress(ValueError):
                s.check(request)
                s.add(request)
        if s.running and rng.random() < 0.1:
            s.abort(rng.choice(s.running).request.id)
        before = [seq.request.id for seq in s.running]  # ids count arrivals here
        chosen = s.schedule()
        assert all(n >= 1 for _, n in chosen) and sum(n for _, n in chosen) <= budget
        assert len(s.running) <= max_seqs
        ran = [seq.request.id for seq, _ in chosen if seq.request.id in before]
        assert ran == sorted(ran)  # running sequences oldest first
        kept = [i for i in before if any(seq.request.id == i for seq in s.running)]
        preempted = [i for i in before if i not in kept]
        assert not kept or not preempted or max(kept) < min(preempted)  # the newest are preempted
        s.finish(chosen, {seq.request.id: 7 for seq, n in chosen})
        waiting = [seq.request.id for seq in s.waiting]
        assert waiting == sorted(waiting)
        # and all of them arrived after every running one: a preempted sequence goes to the front
        assert not waiting or not s.running or max(seq.request.id for seq in s.running) < waiting[0]
        assert sorted(s.pool.free_ids() + blocks_held(s)) == list(range(blocks))
        assert all(not seq.blocks for seq in s.waiting)  # preempted sequences hold nothing
    while s.has_work:
        step(s)
    assert sorted(s.pool.free_ids()) == list(range(blocks))


@pytest.mark.parametrize("field, value", [("block_size", 0), ("max_batched_tokens", -1), ("max_seqs", 1.5),
                                          ("num_blocks", 0), ("num_blocks", 2.0), ("kv_cache_gb", 0.0)])
def test_engine_config_refuses_a_size_below_one_naming_the_flag(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        EngineConfig(**{field: value})
    EngineConfig(**{field: 1})  # the smallest that is allowed


def test_engine_config_takes_a_memory_fraction_in_zero_one_inclusive():
    for value in (1e-9, 0.5, 1, 1.0):
        assert EngineConfig(gpu_memory_utilization=value).gpu_memory_utilization == value
    for value in (0, 0.0, -0.5, 1.0000001, 2):
        with pytest.raises(ValueError, match="gpu-memory-utilization .* must be in"):
            EngineConfig(gpu_memory_utilization=value)


def test_check_refuses_only_requests_that_can_never_fit():
    """A request's KV holds prompt + max_tokens - 1 tokens at most (the last token is never fed)."""
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=8), num_blocks=3)
    whole_pool = Request("whole pool", (1,) * 9, max_tokens=4)  # 12 tokens: 3 blocks, over the budget
    s.check(whole_pool)  # chunked: a prompt longer than the budget is prefilled in pieces
    with pytest.raises(ValueError, match="needs 4 KV blocks but the pool has 3"):
        s.check(Request("over", (1,) * 9, max_tokens=5))
    s.add(whole_pool)
    outputs = []
    while s.has_work:
        chosen = s.schedule()
        outputs += s.finish(chosen, {seq.request.id: 7 for seq, n in chosen})
    assert [(o.token, o.index, o.finished) for o in outputs] == [(7, 0, None), (7, 1, None), (7, 2, None),
                                                                  (7, 3, "length")]
    assert sorted(s.pool.free_ids()) == [0, 1, 2]
    whole = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=8, chunked_prefill=False), num_blocks=3)
    whole.check(Request("one prefill", (1,) * 8, max_tokens=1))
    with pytest.raises(ValueError, match="max-batched-tokens 8"):
        whole.check(Request("two prefills", (1,) * 8, max_tokens=2))


def test_finish_reports_every_sampled_token_and_why_a_sequence_stops():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=4), num_blocks=8, eos=(2,))
    s.add(Request("eos", (1, 1), max_tokens=5))
    s.add(Request("stop", (1,) * 5, max_tokens=5, stop=(9,)))  # 5 prompt tokens: 2 chunks
    s.add(Request("length", (1,), max_tokens=1))
    tokens = {"eos": [3, 2], "stop": [9], "length": [4]}
    seen = []
    while s.has_work:
        chosen = s.schedule()
        sampled = [seq.request.id for (seq, n), yes in zip(chosen, s.sampled(chosen)) if yes]
        outputs = s.finish(chosen, {i: tokens[i].pop(0) for i in sampled})
        assert [o.request_id for o in outputs] == sampled
        seen += [(o.request_id, o.token, o.index, o.finished) for o in outputs]
    assert sorted(seen) == [("eos", 2, 1, "stop"), ("eos", 3, 0, None), ("length", 4, 0, "length"),
                            ("stop", 9, 0, "stop")]


def test_abort_drops_exactly_that_request_and_frees_its_blocks():
    s = Scheduler(EngineConfig(prefix_caching=False, block_size=4, max_batched_tokens=100, max_seqs=1), num_blocks=8)
    for i in "abc":
        s.add(Request(i, (1,) * 5, max_tokens=3))
    assert step(s) == [("a", 5)]  # a holds 2 blocks; b and c wait (one running at most)
    assert s.abort("b") and [seq.request.id for seq in s.waiting] == ["c"]
    assert s.abort("a") and not s.running and s.pool.num_free == 8
    assert not s.abort("a") and not s.abort("missing")
    assert step(s) == [("c", 5)]


def test_a_decode_step_hashes_blocks_only_when_one_fills(monkeypatch):
    """The chain of block hashes grows with the context: a decode step that fills no block must not
    touch it (before, every step rebuilt a slice of it per sequence, host time linear in context)."""
    from expertmesh.engine import scheduler as module

    calls = []
    real = module.chain_hashes
    monkeypatch.setattr(module, "chain_hashes", lambda *a: calls.append(1) or real(*a))
    s = Scheduler(EngineConfig(block_size=4, max_batched_tokens=64), num_blocks=100)
    s.add(Request("a", (1, 2, 3, 4, 5, 6), max_tokens=20))
    step(s)  # prefill: 6 tokens computed, one block full
    filled = []
    for _ in range(12):
        calls.clear()
        before = s.running[0].registered
        step(s)
        filled.append(s.running[0].registered > before)
        assert bool(calls) == filled[-1]
    assert filled.count(True) == 3  # a block of 4 fills every 4 decode steps
    assert s.running[0].registered == s.running[0].computed // 4

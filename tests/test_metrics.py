"""Run metrics from an event log (engine/metrics.py), against arithmetic done by hand."""

import pytest

from expertmesh.engine.metrics import Metrics, merge_step_times


def test_metrics_of_a_hand_computed_event_log():
    # Batch 4, prompt 100, 5 tokens each: submitted at t = 10.0, first token at 10.5, then one
    # every 0.1 s until 10.9.
    m = Metrics.from_events(10.0, [10.5, 10.6, 10.7, 10.8, 10.9], batch_size=4, prompt_len=100)
    assert (m.batch_size, m.prompt_len, m.gen_len) == (4, 100, 5)
    assert m.ttft_s == pytest.approx(0.5)
    assert m.tpot_s == pytest.approx(0.4 / 4)  # 4 gaps after the first token
    assert m.total_s == pytest.approx(0.9)
    assert m.prefill_tps == pytest.approx(4 * 100 / 0.5)  # 800 prompt tokens/s
    assert m.decode_tps == pytest.approx(4 * 4 / 0.4)  # 40 generated tokens/s
    assert m.overall_tps == pytest.approx(4 * 105 / 0.9)  # 466.7 tokens/s
    assert m.to_dict()["tpot_s"] == pytest.approx(0.1)


def test_uneven_steps_give_the_mean_gap():
    m = Metrics.from_events(0.0, [2.0, 2.1, 2.6, 2.7], batch_size=1, prompt_len=8)
    assert m.tpot_s == pytest.approx(0.7 / 3)
    assert m.decode_tps == pytest.approx(3 / 0.7)


def test_one_generated_token_has_no_tpot_or_decode_tps():
    m = Metrics.from_events(1.0, [3.0], batch_size=2, prompt_len=10)
    assert m.tpot_s is None and m.decode_tps is None
    assert m.ttft_s == pytest.approx(2.0) and m.total_s == pytest.approx(2.0)
    assert m.prefill_tps == pytest.approx(10.0)
    assert m.overall_tps == pytest.approx(2 * 11 / 2.0)


@pytest.mark.parametrize("start, steps", [
    (5.0, [4.0, 6.0]),  # first token before the submission
    (0.0, [1.0, 3.0, 2.0]),  # a step before the one it follows
])
def test_decreasing_times_are_rejected(start, steps):
    with pytest.raises(ValueError, match="must not decrease"):
        Metrics.from_events(start, steps, batch_size=1, prompt_len=1)


def test_an_empty_log_is_rejected():
    with pytest.raises(ValueError, match="no token was generated"):
        Metrics.from_events(0.0, [], batch_size=1, prompt_len=1)


def test_merge_takes_the_slowest_rank_at_each_step_relative_to_each_start():
    start, steps = merge_step_times([
        (100.0, [100.2, 100.5, 100.6]),  # relative: 0.2, 0.5, 0.6
        (50.0, [50.3, 50.4, 50.9]),  # relative: 0.3, 0.4, 0.9
    ])
    assert start == 0.0
    assert steps == pytest.approx([0.3, 0.5, 0.9])


def test_merge_of_one_rank_is_its_own_log():
    assert merge_step_times([(2.0, [2.5, 3.0])]) == (0.0, [0.5, 1.0])

"""The prefill / decode loop on one device (engine/generate.py): the tokens of a naive greedy loop,
whatever the micro-batching, and an event log per step."""

import pytest
import torch

from expertmesh.config import Workload
from expertmesh.engine.generate import generate
from expertmesh.split import split_evenly


@pytest.mark.parametrize("n, parts", [(7, 3), (2, 3), (0, 2), (5, 1), (8, 4)])
def test_micro_batches_cover_the_rows_in_order_with_sizes_within_one(n, parts):
    slices = split_evenly(n, parts)
    assert len(slices) == parts
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("batch", [4, 2], ids=["uneven micro-batches", "an empty micro-batch"])
def test_greedy_tokens_equal_a_naive_loop_for_one_and_three_split_evenly(batch, small_model,
                                                                          naive_greedy):
    model = small_model(seed=1)
    w = Workload(batch_size=batch, prompt_len=6, gen_len=5, seed=2)
    prompts = w.prompts(model.cfg)
    rows = list(range(batch))
    one = generate(model, w, prompts, rows, n_micro=1, record_logits=True)
    three = generate(model, w, prompts, rows, n_micro=3)
    assert one.tokens.shape == (batch, 5) and one.rows == rows
    assert torch.equal(one.tokens, three.tokens)
    assert torch.equal(one.tokens, naive_greedy(model, prompts, 5))
    assert one.logits.shape == (batch, 5, model.cfg.vocab_size)
    assert torch.equal(one.logits.argmax(-1), one.tokens)


def test_sampled_tokens_do_not_depend_on_micro_batching(small_model):
    model = small_model()
    w = Workload(batch_size=5, prompt_len=4, gen_len=6, seed=3, temperature=1.5, top_p=0.95)
    prompts = w.prompts(model.cfg)
    one = generate(model, w, prompts, list(range(5)), n_micro=1)
    three = generate(model, w, prompts, list(range(5)), n_micro=3)
    assert torch.equal(one.tokens, three.tokens)
    greedy = generate(model, Workload(batch_size=5, prompt_len=4, gen_len=6, seed=3), prompts,
                      list(range(5)))
    assert not torch.equal(one.tokens, greedy.tokens)


def test_a_rank_with_some_rows_samples_what_the_whole_batch_samples_for_them(small_model):
    model = small_model()
    w = Workload(batch_size=4, prompt_len=4, gen_len=3, seed=1, temperature=1.0)
    prompts = w.prompts(model.cfg)
    whole = generate(model, w, prompts, [0, 1, 2, 3])
    part = generate(model, w, prompts[2:], [2, 3])
    assert torch.equal(part.tokens, whole.tokens[2:])


def test_the_event_log_has_one_nondecreasing_time_per_token_after_the_start(small_model):
    model = small_model()
    w = Workload(batch_size=2, prompt_len=3, gen_len=4)
    gen = generate(model, w, w.prompts(model.cfg), [0, 1])
    assert len(gen.step_times) == 4
    assert gen.start <= gen.step_times[0]
    assert gen.step_times == sorted(gen.step_times)
    cfg = model.cfg
    assert gen.kv_cache_bytes == cfg.n_layers * 2 * 2 * 7 * cfg.n_kv_heads * cfg.head_dim * 4
    assert gen.logits is None

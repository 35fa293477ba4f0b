"""A micro-batch's sampling values (`engine/sampling_rows.py`) are gathered again exactly when its
sequences or their draws change: a run of decode steps over the same sequences reuses them, and
the draws still follow each request's own values as the batch changes."""

from expertmesh.deployment import Deployment
from expertmesh.engine import sampling_rows
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.sampling_rows import SamplingRows
from expertmesh.engine.scheduler import EngineConfig, Sequence


def _seq(i: int, **options) -> Sequence:
    return Sequence(Request(i, (1, 2, 3), 4, **options), i, [1, 2, 3])


def test_rows_are_reused_only_for_the_same_sequences_and_draws():
    a, b, c = _seq(0, temperature=0.5, seed=7), _seq(1), _seq(2, top_k=3, logprobs=2)
    rows = SamplingRows([(a, 1), (b, 1)], [True, True])
    assert (rows.temperature, rows.seeds, rows.draws, rows.asks_logprobs) == ([0.5, 0.0], [7, 0], True, False)
    assert SamplingRows.reuse(rows, [(a, 1), (b, 1)], [True, True]) is rows  # a new list, the same sequences
    for chosen, sampled in (([(a, 1), (c, 1)], [True, True]),  # another sequence in b's place
                            ([(b, 1), (a, 1)], [True, True]),  # another order
                            ([(a, 1), (b, 3)], [True, False])):  # b's chunk stops short of its end
        new = SamplingRows.reuse(rows, chosen, sampled)
        assert new is not rows and new.seqs == [chosen[i][0] for i, s in enumerate(sampled) if s]
    assert SamplingRows.reuse(rows, [(a, 1), (c, 1)], [True, True]).logprobs == [None, 2]


def test_a_run_of_decode_steps_gathers_the_values_once_per_change_of_its_sequences(small_model, monkeypatch):
    built = []
    real = SamplingRows.__init__
    monkeypatch.setattr(sampling_rows.SamplingRows, "__init__",
                        lambda self, chosen, sampled: built.append(len(chosen)) or real(self, chosen, sampled))
    model = small_model(seed=4)
    engine = Engine(model, model.cfg, Deployment(), EngineConfig(block_size=4, num_blocks=32, max_seqs=8))
    for i, n in enumerate((6, 6, 3)):  # one prefill step, two decode steps of 3, then three of 2
        engine.add_request(Request(i, (3, 1, 4, 1 + i), n, temperature=0.7 * (i != 1), seed=i))
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    engine.shutdown()
    assert steps == 6 and built == [3, 3, 2], built  # the prefill, its first decode, after request 2 ended

"""The simulator's serving mode schedules with the engine's own scheduler, block pool and
data-parallel router (sim/replica.py, sim/serving.py): one admission policy. Each test holds the
simulator (and, for the first, the engine itself) to decisions worked out by hand here."""

import pytest
import torch

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.sim import serving
from expertmesh.sim.hardware import get_profile
from expertmesh.sim.scenario import Scenario
from expertmesh.sim.serving import replay, simulate_serving
from expertmesh.sim.stream import Arrival, poisson_stream

H100 = get_profile("h100")

# Two 6-token prompts, 8 tokens each, in a pool of 6 blocks of 4 tokens and 8 tokens a step.
TIGHT = EngineConfig(block_size=4, num_blocks=6, max_batched_tokens=8, max_seqs=4)
A = Request("A", (1, 2, 3, 4, 5, 6), max_tokens=8)
B = Request("B", (7, 8, 9, 10, 11, 12), max_tokens=8)
# By hand: step 1 prefills A whole (2 blocks) and B's first 2 tokens (1 block) in the budget;
# step 2 decodes A and ends B's prompt (B's first token). Both decode; B takes its third block
# at step 5, the pool's last. At step 8 A needs a fourth block: B, the newest, is preempted (its
# 11 computed tokens leave 2 full blocks cached, the partial one plain, which A takes) and, with
# 2 blocks free, cannot come back (its 2 cached blocks + 1 new). A ends at step 8 (8 tokens),
# and B resumes from its 8 cached tokens: 4 recomputed, then its last token.
DECISIONS = ([[("A", 6), ("B", 2)], [("A", 1), ("B", 4)]] + [[("A", 1), ("B", 1)]] * 5
             + [[("A", 1)], [("B", 4)], [("B", 1)]])


def _single(prompt: int = 100) -> Scenario:
    return Scenario(preset("paper"), Deployment(), Workload(batch_size=1, prompt_len=prompt, gen_len=2), H100)


def _ids(chosen) -> list[tuple]:
    return [(seq.request.id, n) for seq, n in chosen]


def test_the_simulator_admits_and_preempts_as_worked_out_by_hand(monkeypatch):
    steps = []

    class Recorded(serving.Replica):
        def step(self, new):
            chosen = super().step(new)
            steps.append(_ids(chosen[0]))
            return chosen

    monkeypatch.setattr(serving, "Replica", Recorded)
    served = replay(_single(), [Arrival(0.0, A), Arrival(0.0, B)], TIGHT)
    assert steps == DECISIONS
    assert served.preemptions == 1 and served.output_tokens == 16
    # B's first token came while A ran: the old loop reserved each request's whole context (14
    # tokens each, 28 > the pool's 24) and held B back until A had ended
    assert served.ttft_s[1] < served.ttft_s[0] + 7 * served.tpot_s[0]


def test_the_engine_itself_makes_the_same_decisions():
    from conftest import SMALL
    from expertmesh.model.transformer import reference_model
    torch.set_num_threads(1)
    model = reference_model(preset("tiny", **SMALL), seed=5)
    engine = Engine(model, model.cfg, Deployment(), TIGHT, eos=())
    steps, schedule = [], engine.scheduler.schedule

    def recorded():
        chosen = schedule()
        steps.append(_ids(chosen))
        return chosen

    engine.scheduler.schedule = recorded
    engine.add_request(A)
    engine.add_request(B)
    while engine.has_work:
        engine.step()
    assert steps == DECISIONS


def test_data_parallel_ranks_are_the_engines_each_placing_by_its_router():
    """ep2: two requests at once go one to each rank (the first to rank 0: a tie on free blocks
    and queue, lowest index; the second to the rank with more free blocks), and a step costs
    each rank its own sequences: rank 0 a 40-token prompt, rank 1 a 100-token one."""
    sc = Scenario(preset("paper"), Deployment(ep=2), Workload(batch_size=2, prompt_len=100, gen_len=2), H100)
    cfg = serving.engine_config(sc)
    replica = serving.Replica(2, cfg)
    chosen = replica.step([Request(0, tuple(range(40)), max_tokens=2), Request(1, tuple(range(100, 200)), max_tokens=2)])
    assert [_ids(c) for c in chosen] == [[(0, 40)], [(1, 100)]]
    assert serving.step_work(sc, chosen) == (((1.0, 48, 0.0),), ((1.0, 128, 0.0),))  # lengths bucketed


def test_a_shared_prefix_is_found_in_the_pool_and_prefilled_once():
    """Prompts repeat int(0.9 P) tokens of one shared sequence: every request after the first
    finds (nearly) all of that part cached once an earlier one computed it; the first finds none."""
    arrivals = poisson_stream(0.5, 2000, 20, 40, prefix_hit_rate=0.9)
    assert arrivals[1].request.prompt[:100] == arrivals[0].request.prompt[:100] == tuple(range(100))
    assert not set(arrivals[0].request.prompt[-100:]) & set(arrivals[1].request.prompt)
    served = simulate_serving(_single(2000), 0.5, 2000, 20, requests=40, prefix_hit_rate=0.9)
    assert 0.8 < served.cached_fraction < 0.9


def test_a_request_no_rank_can_hold_is_refused_before_any_step():
    with pytest.raises(ValueError, match="KV blocks but the pool has 6"):
        replay(_single(), [Arrival(0.0, Request("long", tuple(range(30)), max_tokens=2))], TIGHT)

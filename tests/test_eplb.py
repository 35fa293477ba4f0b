"""Online expert load balancing (`parallel/eplb.py`, `eplb_plan.py`, `expert_moves.py`).

Served on local gloo ranks, a mixed stream of requests (staggered arrivals, aborts, preemption)
under a skew whose hot experts move every few steps gives the same greedy fp32 tokens with online
rebalancing as without it, across several rebalances; every rank of a layer's EP group switches
it at the same step; with the weight copies slowed down (sent from a thread, long after the step
that posted them) no slot table ever names a slot whose weights differ from its expert's in the
unsharded model; the planner never does worse than the placement it starts from.
"""

import functools
import threading
import time

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.engine import Engine
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.serve import serve
from expertmesh.engine.shard import load_rank
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import eplb_controller
from expertmesh.launch import launch
from expertmesh.model.transformer import reference_model
from expertmesh.parallel import eplb_plan, expert_moves
from expertmesh.parallel.eplb import EplbConfig
from expertmesh.parallel.eplb_plan import start_placement
from expertmesh.parallel.expert import dispatchers
from serving import Mixed

SEED = 11
CFG = preset("tiny", router_skew=1.2, router_skew_shift=5)
# a small pool: long prompts preempt running sequences
PREEMPTING = EngineConfig(num_blocks=12, block_size=8, max_batched_tokens=128, max_seqs=8)
EPLB = EplbConfig(interval=4, window=3, layers_per_step=1, margin=0.0)


@pytest.fixture(scope="module")
def mixed():
    torch.set_num_threads(1)
    return Mixed(reference_model(CFG, seed=SEED), n=24, max_prompt=80, max_new=12, spread=10,
                 n_aborts=3, seed=2)


def _spec(deployment: str, eplb: EplbConfig | None) -> RunSpec:
    dep = Deployment.parse(deployment)
    placement = [start_placement(CFG.n_experts, dep.ep, 1) for _ in range(CFG.n_layers)]
    spec = RunSpec(CFG, dep, Workload(), seed=SEED, placement=placement, eplb=eplb)
    spec.validate(dep.world_size)
    return spec


class _SlowSends:
    """torch.distributed for `expert_moves`, but a move's sends leave from a thread `delay`
    seconds after the step that posted them (its receives are posted at once)."""

    def __init__(self, delay: float):
        self.delay = delay

    def __getattr__(self, name):
        return getattr(dist, name)

    def batch_isend_irecv(self, ops):
        works = [dist.irecv(op.tensor, op.peer, op.group) for op in ops if op.op is dist.irecv]
        sends = [op for op in ops if op.op is not dist.irecv]

        def later():
            time.sleep(self.delay)
            for op in sends:
                dist.send(op.tensor, op.peer, op.group)

        thread = threading.Thread(target=later)
        thread.start()
        return works + [_Joined(thread)]


class _Joined:
    def __init__(self, thread):
        self.thread = thread

    def wait(self):
        self.thread.join()


def _serve(spec: RunSpec, work: Mixed, slow: float, device):
    """This rank serves `work` -> (transcript or None, EPLB summary, switches [(step, layer,
    placement)], slot checks made, slot checks failed)."""
    torch.set_num_threads(1)
    if slow:
        expert_moves.dist = _SlowSends(slow)
    rank = dist.get_rank()
    model, links, _ = load_rank(spec, device)
    eplb = eplb_controller(spec, model, rank)
    reference = reference_model(spec.cfg, seed=SEED)
    switches, checks = [], [0, 0]
    for layer, d in dispatchers(model).items():
        def logged(placement, layer=layer, switch=d.switch):
            switches.append((eplb.step if eplb else None, layer, placement))
            switch(placement)
        d.switch = logged

    def check_slots():
        """Every slot of every layer held here holds its expert's weights (the unsharded model's)."""
        for layer, d in dispatchers(model).items():
            full = dict(reference.layers[str(layer)].moe.experts.named_parameters())
            for name, param in model.layers[str(layer)].moe.experts.named_parameters():
                checks[0] += 1
                checks[1] += not torch.equal(param, full[name][d.placement[d.rank]])

    if eplb:
        begin = eplb.begin_step

        def begin_and_check():
            begin()
            check_slots()
        eplb.begin_step = begin_and_check
    engine = Engine(model, spec.cfg, spec.deployment, PREEMPTING, rank, links, (work.eos,),
                    n_micro=spec.micro_batches, eplb=eplb)
    transcript = serve(engine, work.arrivals, work.aborts)
    mine = (rank, eplb.summary() if eplb else None, switches, checks)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return transcript, everyone


def _run(deployment: str, work: Mixed, eplb: EplbConfig | None, slow: float = 0.0):
    spec = _spec(deployment, eplb)
    return launch(functools.partial(_serve, spec, work, slow), spec.deployment.world_size, timeout=300)


@pytest.mark.parametrize("deployment", ["ep4", "ep2pp2"])
def test_online_rebalancing_changes_no_token_and_switches_every_rank_at_one_step(deployment, mixed):
    without, _ = _run(deployment, mixed, None)
    with_eplb, ranks = _run(deployment, mixed, EPLB)
    assert with_eplb.tokens == without.tokens and with_eplb.finished == without.finished
    assert sum(s.preemptions for s in without.rank_stats) > 0  # the workload preempts
    assert set(mixed.aborted) & set(without.tokens)
    dep = Deployment.parse(deployment)
    for stage in range(dep.pp):
        group = [r for r in ranks if r[0] // dep.inner == stage]
        logs = [sorted((step, layer, str(p)) for step, layer, p in r[2]) for r in group]
        assert all(log == logs[0] for log in logs), "ranks of a group switched differently"
        assert len({step for step, _, _ in logs[0]}) >= 3  # several rebalances, at several steps
        assert all(r[3][1] == 0 and r[3][0] > 0 for r in group)  # every slot always held its expert


def test_slowed_copies_never_leave_a_slot_table_pointing_at_missing_weights(mixed):
    without, _ = _run("ep4", mixed, None)
    slowed, ranks = _run("ep4", mixed, EPLB, slow=0.8)
    assert slowed.tokens == without.tokens
    assert all(r[3][0] > 0 and r[3][1] == 0 for r in ranks)
    assert sum(len(r[2]) for r in ranks) >= 4
    # the copies came late: some step that finished a move waited for them (most steps take
    # well under the delay, even on a loaded machine)
    assert max(max(r[1]["stalls"]) for r in ranks) >= 0.3


def test_the_planner_lowers_the_imbalance_and_never_raises_it():
    loads = [100, 60, 40, 30, 20, 10, 8, 6, 5, 4, 3, 2, 2, 1, 1, 1]
    start = start_placement(16, 4, 1)
    new = eplb_plan.plan_layer(start, 4, loads, margin=0.1)
    # by hand: rank 0 holds experts 0-3 (230 of 292 rows); replicas of 0, 1 and 2 elsewhere
    # take half of theirs off it
    naive = [sum(loads[e] for e in range(4 * r, 4 * r + 4)) for r in range(4)]
    assert new is not None and [row[:4] for row in new] == [row[:4] for row in start]
    assert eplb_plan.imbalance(new, loads) < max(naive) / (sum(naive) / 4) * 0.9
    assert eplb_plan.plan_layer(new, 4, loads, margin=0.1) is None  # nothing better left
    assert eplb_plan.plan_layer(start, 4, [1] * 16, margin=0.1) is None  # even: keep it


BAD_FLAGS = {
    "interval zero": (["run", "--deployment", "ep2", "--redundant-experts", "1", "--eplb-interval", "0"],
                      "--eplb-interval 0 must be at least 1 step"),
    "window past interval": (["run", "--deployment", "ep2", "--redundant-experts", "1", "--eplb-interval", "10",
                              "--eplb-window", "20"], "--eplb-window 20 must be between 1 and --eplb-interval 10"),
    "window alone": (["run", "--deployment", "ep2", "--eplb-window", "5"], "add --eplb-interval K"),
    "layers per step zero": (["run", "--deployment", "ep2", "--redundant-experts", "1", "--eplb-interval", "4",
                              "--eplb-layers-per-step", "0"], "--eplb-layers-per-step 0 must be at least 1"),
    "no spare slots": (["run", "--deployment", "ep2", "--eplb-interval", "4"], "add --redundant-experts R"),
    "not ep": (["run", "--deployment", "tp2", "--redundant-experts", "1", "--eplb-interval", "4"],
               "acts on expert-parallel deployments only"),
    "too many spares": (["run", "--deployment", "ep2", "--redundant-experts", "9", "--eplb-interval", "4"],
                        "exceed the 8 experts another rank holds"),
    "skew shift": (["run", "--deployment", "ep2", "--router-skew", "zipf:1.2,shift:0"], "shift:N (N >= 1 steps)"),
    "simulate not ep": (["simulate-eplb", "--deployment", "tp2"], "give --deployment epN, not tp2"),
    "simulate window": (["simulate-eplb", "--eplb-interval", "10", "--eplb-window", "11"],
                        "--eplb-window 11 must be between 1 and --eplb-interval 10"),
    "serve interval zero": (["serve", "--deployment", "ep2", "--redundant-experts", "1", "--eplb-interval", "0"],
                            "--eplb-interval 0 must be at least 1 step"),
}


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_eplb_flags_are_one_error_line_before_any_rank_starts(name, cli_error):
    argv, expected = BAD_FLAGS[name]
    assert expected in cli_error(argv)


WINDOWED = EplbConfig(interval=3, window=2, margin=1.0)  # measures, never adopts (nothing moves)
STEPS = 7


def _host_reads_per_step(eplb: EplbConfig | None, device) -> list[int]:
    """ep2 on the pretend accelerator, the low-latency exchange (no read of its own): 8 requests
    prefill, then decode; host reads of each of `STEPS` engine steps on this rank."""
    from expertmesh.engine.request import Request
    from expertmesh.engine.shard import shard_model
    from expertmesh.model.synthetic import materialize
    from expertmesh.parallel.mesh import stage_group
    from fake_device import FakeDevice, move_to_device

    torch.set_num_threads(1)
    cfg = preset("tiny", n_layers=2, router_skew=1.2)
    dep = Deployment.parse("ep2")
    spec = RunSpec(cfg, dep, Workload(), placement=[start_placement(16, 2, 1)] * 2, eplb=eplb)
    rank = dist.get_rank()
    model = materialize(shard_model(spec, rank, stage_group(dep, rank)), seed=3, dtype=torch.float32)
    engine_cfg = EngineConfig(block_size=4, num_blocks=40, max_batched_tokens=64, max_seqs=8, chunked_prefill=False)
    with FakeDevice() as mode:
        model = move_to_device(model)
        engine = Engine(model, cfg, dep, engine_cfg, rank, eplb=eplb_controller(spec, model, rank))
        if rank == 0:
            for i in range(8):
                engine.add_request(Request(i, tuple((7 * i + 5 * j) % cfg.vocab_size for j in range(6)), 12))
        reads = []
        for _ in range(STEPS):
            before = mode.counts()[0]
            engine.step()
            reads.append(mode.counts()[0] - before)
        engine.shutdown() if rank == 0 else engine.step()
    return reads


def test_the_load_window_is_read_on_the_host_once_per_window():
    plain = launch(functools.partial(_host_reads_per_step, None), 2, timeout=120)
    windowed = launch(functools.partial(_host_reads_per_step, WINDOWED), 2, timeout=120)
    # windows close at steps 2 and 5 (the last 2 of every 3): one read each, all layers together
    assert [w - p for w, p in zip(windowed, plain)] == [0, 0, 1, 0, 0, 1, 0]


def test_a_server_rebalancing_online_answers_transformers_tokens_and_reports_it_in_metrics(tmp_path):
    """`serve` on ep2 of a real (tiny Qwen2-MoE) checkpoint, one spare slot per rank, windows of 2
    steps every 4: greedy tokens equal transformers'; /metrics has the window's imbalance per
    layer, the rebalance counter and the stall histogram."""
    pytest.importorskip("fastapi", reason="expertmesh serve needs the serve extra (pip install -e '.[serve]')")
    pytest.importorskip("transformers", reason="the tiny checkpoint is built with transformers")
    from expertmesh.checkpoint.tiny import reference_greedy, save_tiny_checkpoint
    from test_server import Server

    checkpoint = save_tiny_checkpoint("qwen2_moe", tmp_path / "tinyqwen", tokenizer=True)
    server = Server(tmp_path, "--model", str(checkpoint), "--deployment", "ep2", "--num-blocks", "64",
                    "--block-size", "8", "--redundant-experts", "1", "--eplb-interval", "4",
                    "--eplb-window", "2", "--timeout", "120")
    try:
        prompts = [[(11 * i + 3 * j) % 200 + 1 for j in range(5 + i)] for i in range(6)]
        for prompt in prompts:
            r = server.client.completions.create(model="tinyqwen", prompt=prompt, max_tokens=12, temperature=0)
            want = reference_greedy(checkpoint, torch.tensor([prompt]), 12)[0][0].tolist()
            assert r.choices[0].token_ids == want
        deadline = time.monotonic() + 60  # the ranks' counters arrive every few steps
        while server.metric("expertmesh_eplb_step_stall_seconds_count") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert server.metric("expertmesh_eplb_window_imbalance", layer=0) >= 1.0
        assert server.metric("expertmesh_eplb_rebalances_total") >= 0
    finally:
        server.proc.terminate()  # SIGTERM: the ranks stop through the engine, moves in flight finish
        server.proc.wait(90)
        server.stop()


def test_the_simulator_rebalances_a_steady_skew_once_and_prices_the_move():
    from expertmesh.sim.eplb import EplbScenario, move_cost, simulate_eplb
    from expertmesh.sim.hardware import get_profile
    from expertmesh.sim.routing import Routing

    steady = EplbScenario(16, 2, 4, 1, Routing.parse("zipf:1.2"), shift=0, interval=10, window=5, layers=2)
    r = simulate_eplb(steady, 100)
    assert r["rebalances"] == 1  # a steady skew: nothing better after the first plan
    # by hand: ranks 0..3 hold experts 0-3, 4-7, ...; rank r's spare holds expert 4(r+1) mod 16,
    # which halves that expert's load between two ranks
    shares = Routing.parse("zipf:1.2").shares(16, 2)
    ranks = [sum(shares[4 * r + i] for i in range(4)) - shares[4 * r] / 2 + shares[4 * ((r + 1) % 4)] / 2
             for r in range(4)]
    assert r["static_per_step"][0] == pytest.approx(max(ranks) / (sum(ranks) / 4))
    # plan at step 9, posted at 10, both layers switched by step 12 (one layer a step)
    assert r["online_per_step"][11] < r["static_per_step"][11]
    assert r["online_per_step"][12:] == [r["online_per_step"][12]] * 88 and r["online_per_step"][12] < 1.6
    uniform = simulate_eplb(EplbScenario(16, 2, 4, 1, Routing(), 0, 10, 5, 2), 30)
    assert uniform["imbalance_static"] == pytest.approx(1.0) and uniform["rebalances"] == 0
    h100 = get_profile("h100")
    cost = move_cost(h100, 1 << 20, 3, 16)  # 16 ranks, 8 per node: over the network
    assert cost["link"] == "network" and cost["copy_s"] == pytest.approx(3 * 2**20 / (h100.net_bw * h100.net_efficiency)
                                                                     + h100.net_latency_s)


def test_a_run_reports_its_rebalances_in_the_json_and_keeps_its_tokens():
    from expertmesh.engine.worker import run

    cfg = preset("tiny", n_layers=2, router_skew=1.2)
    dep = Deployment.parse("ep4")
    workload = Workload(batch_size=8, prompt_len=6, gen_len=10, seed=1)
    base = RunSpec(cfg, dep, workload, placement=[start_placement(16, 4, 1)] * 2)
    plain = run(base, timeout=300)
    online = run(RunSpec(cfg, dep, workload, placement=base.placement, eplb=EplbConfig(4, 2)), timeout=300)
    assert torch.equal(plain.tokens, online.tokens)
    figures = online.to_dict()["eplb"]
    assert figures["rebalances"] >= 1 and figures["layer_switches"] >= 4  # every rank switched a layer
    assert figures["imbalance_after"] < figures["imbalance_before"]
    assert len(figures["window_imbalance"]) == 2 and figures["max_step_stall_s"] > 0
    assert "eplb" not in plain.to_dict()

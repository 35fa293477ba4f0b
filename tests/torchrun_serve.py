"""Run under torchrun by tests/test_torchrun.py: serve a staggered stream of requests (with an
abort) on the deployment given, write rank 0's transcript as JSON.

    torchrun ... tests/torchrun_serve.py DEPLOYMENT OUT.json
"""

import dataclasses
import functools
import json
import random
import sys

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.request import Request
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.engine.spec import RunSpec
from expertmesh.engine.worker import replay_rank
from expertmesh.launch import launch

ENGINE = EngineConfig(num_blocks=24, block_size=8, max_batched_tokens=48, max_seqs=4)
ABORTED = 3


def arrivals(vocab: int) -> list[tuple[int, Request]]:
    """12 requests, prompts of 1..80 tokens, two arriving every step or so."""
    rng = random.Random(7)
    return [(i // 2, Request(i, tuple(rng.randrange(vocab) for _ in range(rng.randint(1, 80))),
                             max_tokens=rng.randint(1, 6))) for i in range(12)]


def main(deployment: str, out: str) -> None:
    cfg = preset("tiny")
    dep = Deployment.parse(deployment)
    spec = RunSpec(cfg, dep, Workload(), seed=0)
    spec.validate(dep.world_size)
    fn = functools.partial(replay_rank, spec, ENGINE, arrivals(cfg.vocab_size), [(2, ABORTED)])
    transcript = launch(fn, dep.world_size, timeout=120)
    if transcript is not None:
        with open(out, "w") as f:
            json.dump({"tokens": transcript.tokens, "finished": transcript.finished,
                       "rank_stats": [dataclasses.asdict(s) for s in transcript.rank_stats]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Every tensor that reaches a kernel lives on the activations' device, and a decode step reads
the device from the host only where the design needs it (one count copy per EP MoE layer).

Run on this CPU-only machine with `fake_device.FakeDevice`: parameters and activations pretend to
be on another device, so a host tensor handed to a kernel (the `offs` of `torch._grouped_mm`
built on the host, say) fails here as it would on a GPU, and every device-to-host read is counted.
"""

import functools

import pytest
import torch
import torch.distributed as dist

from expertmesh.config import Workload, preset
from expertmesh.deployment import Deployment
from expertmesh.engine.shard import shard_model
from expertmesh.engine.spec import RunSpec
from expertmesh.launch import launch
from expertmesh.model import moe
from expertmesh.model.forward_context import forward_context
from expertmesh.model.synthetic import materialize
from expertmesh.parallel.mesh import stage_group
from fake_device import FakeDevice, MixedDevices, OnDevice, move_to_device, to_host

CFG = preset("tiny", n_layers=2)
PROMPT, BATCH = 6, 4


def _prefill_and_decode(model, prompts: torch.Tensor, device_mode: FakeDevice | None,
                        low_latency_tokens: int | None = None):
    """Logits of a prefill and one decode step, and the host reads of the decode step."""
    b = prompts.shape[0]
    caches = model.make_caches(b, PROMPT + 1)
    ids = OnDevice(prompts) if device_mode else prompts
    with torch.no_grad(), forward_context(low_latency_tokens):  # no_grad: inference tensors cannot back a subclass's views
        first = model(ids, caches, slice(0, b), 0)
        next_ids = first.argmax(-1, keepdim=True)
        before = device_mode.syncs if device_mode else 0
        second = model(next_ids, caches, slice(0, b), PROMPT)
        syncs = device_mode.syncs - before if device_mode else 0
    return to_host(first), to_host(second), syncs


def _rank_on_fake_device(deployment: str, grouped: bool, device) -> tuple[float, int]:
    """This rank's shard on the pretend device vs the same shard on the CPU: max |Δlogit| and
    the host reads of one decode step (max over ranks)."""
    deployment, _, exchange = deployment.partition("-")
    dep = Deployment.parse(deployment)
    rank = dist.get_rank() if dist.is_initialized() else 0
    bound = BATCH * PROMPT if exchange == "low-latency" else None  # every rank's tokens, or more
    spec = RunSpec(CFG, dep, Workload())
    group = stage_group(dep, rank) if dist.is_initialized() else None
    rows = dep.rows_of(rank, BATCH)
    prompts = torch.randint(0, CFG.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))[rows]
    host = materialize(shard_model(spec, rank, group), seed=3, dtype=torch.float32)
    want = _prefill_and_decode(host, prompts, None)
    on_device = move_to_device(materialize(shard_model(spec, rank, group), seed=3, dtype=torch.float32))
    applies = moe._grouped_mm_applies
    if grouped:  # the pretend device is no CPU: take the grouped-kernel path as on Hopper
        moe._grouped_mm_applies = lambda x, hidden: True
    try:
        with FakeDevice() as mode:
            got = _prefill_and_decode(on_device, prompts, mode, bound)
    finally:  # `single` runs in the test's own process
        moe._grouped_mm_applies = applies
    diff = max((g - w).abs().max().item() if w.numel() else 0.0 for g, w in zip(got[:2], want[:2]))
    stats = torch.tensor([diff, float(got[2])])
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats[0].item(), int(stats[1])


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-mm", "per-expert-loop"])
@pytest.mark.parametrize("deployment, syncs", [
    ("single", 0), ("ep2", CFG.n_layers), ("ep2-low-latency", 0), ("tp2", 0)])
def test_every_kernel_runs_on_the_activations_device(deployment, syncs, grouped):
    """Outputs equal the CPU run's (standard exchange). With the grouped kernel (bf16 on Hopper) a
    decode step reads the device once per EP MoE layer with the standard exchange (its split
    sizes), and never with the low-latency exchange, in the dropless single-device layers or in
    the TP layers. The per-expert loop (other GPUs) reads each layer's expert counts once."""
    world = Deployment.parse(deployment.partition("-")[0]).world_size
    run = functools.partial(_rank_on_fake_device, deployment, grouped)
    diff, decode_syncs = run(torch.device("cpu")) if world == 1 else launch(run, world, timeout=120)
    assert diff < 1e-5
    assert decode_syncs == (syncs if grouped else CFG.n_layers)


def test_a_host_tensor_handed_to_a_device_kernel_is_caught(monkeypatch):
    """The check itself: `offs` built on the host fails, as `torch._grouped_mm` fails on CUDA."""
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: True)
    experts = move_to_device(materialize(moe.GroupedExperts(4, 16, 32, "mlp"), seed=0, dtype=torch.float32))
    with FakeDevice(), pytest.raises(MixedDevices, match="_grouped_mm"):
        x = OnDevice(torch.randn(6, 16))
        experts(x, torch.tensor([1, 2, 0, 3]))  # counts on the host

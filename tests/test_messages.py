"""The engine's control messages (`engine/messages.py`): every object arrives whole on every rank,
whatever its size; a message larger than the buffer makes every rank grow it alike, never past
MAX_CAPACITY, and once it is WINDOW messages old every step's message is small again."""

import pickle

import torch.distributed as dist

from expertmesh.engine.messages import FIRST_CAPACITY, MAX_CAPACITY, WINDOW, Messages
from expertmesh.launch import launch


def _payload(rank: int, size: int) -> dict:
    """A picklable object of about `size` bytes, different on every rank."""
    return {"rank": rank, "blob": bytes((rank * 7 + i) % 251 for i in range(size)), "none": None}


def _exchange(sizes: list[list[int]], device) -> dict | None:
    """Per round, rank r all-gathers an object of about sizes[round][r] bytes and rank 1
    broadcasts one of about sizes[round][1]; every rank checks what it got against a rebuilt copy."""
    rank, world = dist.get_rank(), dist.get_world_size()
    messages = Messages()
    capacities, single = [], []
    for round_sizes in sizes:
        got = messages.all_gather(_payload(rank, round_sizes[rank]))
        assert got == [_payload(r, round_sizes[r]) for r in range(world)]
        sent = _payload(rank, round_sizes[1]) if rank == 1 else "ignored"
        assert messages.broadcast(sent, src=1) == _payload(1, round_sizes[1])
        capacities.append(messages.capacity)
        single.append(max(len(pickle.dumps(_payload(r, round_sizes[r]))) for r in range(world)))
    everyone = [None] * world
    dist.all_gather_object(everyone, capacities)
    return {"capacities": everyone, "longest": single} if rank == 0 else None


def test_messages_of_every_size_arrive_whole_and_the_buffer_follows_the_recent_ones_alike():
    small, big, huge = 100, 3 * FIRST_CAPACITY, MAX_CAPACITY + 5000
    quiet = WINDOW // 2  # rounds of two small messages each: the long ones leave the window
    rounds = [[small, small, small],        # fits: one collective
              [small, big, small],          # rank 1's does not fit (all-gather and broadcast)
              [big // 2, small, 2 * big],   # two ranks over the grown buffer, by different amounts
              [small, small, small],        # still as large: the long ones are recent
              [small, huge, small],         # one request with a huge stop list: over the largest buffer
              *[[small, small, small]] * quiet]
    out = launch(lambda device: _exchange(rounds, device), 3, timeout=120)
    capacities = out["capacities"]
    assert capacities[0] == capacities[1] == capacities[2]
    grown, longest = capacities[0], out["longest"]
    assert grown[0] == FIRST_CAPACITY  # nothing over: unchanged
    assert grown[1] >= longest[1] > FIRST_CAPACITY and grown[2] >= longest[2] > grown[1]
    assert grown[3] == grown[2]  # the next long message would take one collective again
    assert longest[4] > MAX_CAPACITY and grown[4] == MAX_CAPACITY  # the rest went in a second collective
    assert grown[4 + quiet - 1] == MAX_CAPACITY  # the huge one is in the last WINDOW messages
    assert grown[-1] == FIRST_CAPACITY  # and then every step sends the small buffer again


def _gather_without_all_gather_single(device) -> list:
    """Messages.all_gather on a torch without `all_gather_single` (torch 2.11, the H200 image)."""
    del dist.all_gather_single  # this rank's process only
    return Messages().all_gather(dist.get_rank() * 3)


def test_messages_work_on_a_torch_that_lacks_all_gather_single():
    results = launch(_gather_without_all_gather_single, world_size=2)
    assert results == [0, 3]  # rank 0's view of both ranks

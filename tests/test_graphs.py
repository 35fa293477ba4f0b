"""Decode steps on persistent buffers padded to a bucket (engine/graphs.py), run eagerly on the
CPU as CUDA would replay them: padding changes no token; the padded rows write only the scratch
block; the decode forward reads nothing from the host and allocates by bucket, whatever the
batch's size or lengths; `off` and CPU's `auto` use none of it."""

import pytest

from expertmesh.deployment import Deployment
from expertmesh.engine import graphs
from expertmesh.engine.engine import Engine
from expertmesh.engine.graphs import DecodeGraphs, buckets
from expertmesh.engine.request import Request
from expertmesh.engine.runner import Runner
from expertmesh.engine.scheduler import EngineConfig
from expertmesh.model import moe
from fake_device import DEVICE, FakeDevice, move_to_device
from serving import naive_tokens

# five requests of different lengths: decode steps of 5, 4, 3, 2 and 1 sequences (buckets 8, 4, 2, 1)
PROMPTS = [(3, 1, 4, 1, 5), (9, 2, 6), (5, 3, 5, 8, 9, 7, 9), (3, 2), (3, 8, 4, 6, 2, 6, 4)]
NEW = [2, 3, 4, 5, 6]
ENGINE = EngineConfig(block_size=4, num_blocks=32, max_batched_tokens=64, max_seqs=8)


def serve(engine: Engine) -> dict[int, list[int]]:
    for i, (prompt, n) in enumerate(zip(PROMPTS, NEW)):
        engine.add_request(Request(i, prompt, n))
    tokens = {i: [] for i in range(len(PROMPTS))}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id].append(out.token)
    engine.shutdown()
    return tokens


def test_the_ladder_of_buckets():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(48) == [1, 2, 4, 8, 16, 32, 48]


def test_padding_decodes_to_a_bucket_changes_no_token(small_model, monkeypatch):
    model = small_model(seed=4, n_kv_heads=2)
    ran = []
    forward = DecodeGraphs._forward
    monkeypatch.setattr(DecodeGraphs, "_forward", lambda self, B: ran.append(B) or forward(self, B))
    engine = Engine(model, model.cfg, Deployment(), ENGINE, graphs="padded")
    got = serve(engine)
    for i, (prompt, n) in enumerate(zip(PROMPTS, NEW)):
        assert got[i] == naive_tokens(model, prompt, n), f"request {i}"
    assert set(ran) == {8, 4, 2, 1}, "every bucket ran, with padded rows in all but bucket 1"


def test_padded_rows_write_only_the_scratch_block(small_model):
    model = small_model(seed=4)
    engine = Engine(model, model.cfg, Deployment(), ENGINE, graphs="padded")
    scratch = engine.num_blocks
    pools = engine.runner.pools
    assert all(p.k.shape[0] == scratch + 1 for p in pools.values())
    serve(engine)
    for pool in pools.values():  # the padded rows wrote their token-0 keys into slot 0 of it
        assert pool.k[scratch, 0].abs().sum() > 0 and pool.k[scratch, 1:].abs().sum() == 0


def test_a_padded_decode_forward_reads_nothing_from_the_host_and_allocates_by_bucket(small_model, monkeypatch):
    """Decode steps of 4 and then 3 sequences (bucket 4) at growing lengths: no read of a device
    value, no copy, and the same ops with the same output shapes in each forward."""
    seen = []
    forward = DecodeGraphs._forward

    def counted(self, B):
        before, shapes = mode.counts(), len(mode.shapes)
        out = forward(self, B)
        seen.append((B, tuple(a - b for a, b in zip(mode.counts(), before)), mode.shapes[shapes:]))
        return out

    monkeypatch.setattr(DecodeGraphs, "_forward", counted)
    # the pretend device is a Hopper GPU in bf16, where the experts' grouped kernel applies (the
    # per-expert loop reads each layer's expert counts: no graph captures it)
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: True)
    model = move_to_device(small_model(seed=4))
    with FakeDevice(record_shapes=True) as mode:
        engine = Engine(model, model.cfg, Deployment(), ENGINE, graphs="padded")
        assert engine.runner.device == DEVICE
        for i, (prompt, n) in enumerate(zip(PROMPTS[1:], [2, 3, 3, 3])):
            engine.add_request(Request(i, prompt, n))
        while engine.has_work:
            engine.step()
        engine.shutdown()
    fours = [(counts, shapes) for B, counts, shapes in seen if B == 4]
    assert len(fours) == 2, [B for B, _, _ in seen]  # 4 sequences, then 3 after one ended
    assert all(counts == (0, 0, 0) for _, counts, _ in seen), seen
    assert fours[0][1] == fours[1][1] and len(fours[0][1]) > 100


def test_a_padded_decode_step_uploads_its_rows_and_new_block_ids_not_its_tables(small_model, monkeypatch):
    """Per padded decode step of S sequences, one copy up: ids, positions, slots and kv_lens of the
    largest bucket `[4, 8]`, the rows of the persistent block tables `[S]` and the K block ids
    written since the last step `[2, K]`, int64: 8 (32 + S + 2K) bytes, whatever the context (the
    whole `[8, W]` table, 131 KB at 8k positions in blocks of 4, stays on the device); the rows
    not even that when the last step's tables were these."""
    steps = []
    padded = Runner._padded_decode

    def counted(self, chosen):
        before, bytes_before = mode.uploads, mode.upload_bytes
        held = self.block_tables.rows  # sequence -> (row, its list, ids written)
        new_ids = sum(len(seq.blocks) - (held[seq][2] if seq in held and held[seq][1] is seq.blocks else 0)
                      for seq, _ in chosen)
        out = padded(self, chosen)
        steps.append((len(chosen), new_ids, mode.uploads - before, mode.upload_bytes - bytes_before))
        return out

    monkeypatch.setattr(Runner, "_padded_decode", counted)
    monkeypatch.setattr(moe, "_grouped_mm_applies", lambda x, hidden: True)
    model = move_to_device(small_model(seed=4, max_seq_len=8192))  # W = 2048 blocks a row
    with FakeDevice() as mode:
        got = serve(Engine(model, model.cfg, Deployment(), ENGINE, graphs="padded"))
    plain = small_model(seed=4, max_seq_len=8192)
    assert got == serve(Engine(plain, plain.cfg, Deployment(), ENGINE, graphs="off"))
    assert len(steps) >= 5 and any(k for _, k, _, _ in steps) and any(not k for _, k, _, _ in steps), steps
    # the first decode step's tables are the prefill's (the same rows and width, no new block): the
    # device has them, none go up (`BlockTables.plan`)
    assert steps[0][:2] == (5, 0) and steps[0][2:] == (1, 8 * 32), steps
    for S, K, uploads, sent in steps[1:]:
        assert (uploads, sent) == (1, 8 * (32 + S + 2 * K)), steps


@pytest.mark.parametrize("asked", ["off", "auto"])
def test_off_and_cpu_auto_run_the_plain_forward(small_model, asked):
    model = small_model(seed=4)
    engine = Engine(model, model.cfg, Deployment(), ENGINE, graphs=asked)
    assert engine.runner.graphs is None
    assert all(p.k.shape[0] == engine.num_blocks for p in engine.runner.pools.values())


def test_capacity_keeps_decodes_unpadded(small_model):
    """Padded rows would take capacity places of real ones."""
    model = small_model(seed=4, capacity_factor=1.0)
    assert Engine(model, model.cfg, Deployment(), ENGINE, graphs="padded").runner.graphs is None


def test_an_unknown_mode_is_refused(small_model):
    model = small_model(seed=4)
    with pytest.raises(ValueError, match="decode graph mode"):
        Engine(model, model.cfg, Deployment(), ENGINE, graphs="sometimes")
    assert graphs.MODES == ("auto", "graphs", "padded", "off")

"""Sequence packing (data.packing): whole samples share rows, attention stays within each sample and RoPE positions
restart per sample, so a packed micro-batch gives exactly the per-token losses of the same samples unpacked; the
samples of every step are unchanged, so losses match the unpacked run and stay layout-invariant."""
import os

import pytest
import torch

from megallava import config as C
from megallava.data.batching import IGNORE_INDEX, collate, microbatch_iterator, pack, pack_rows, pad_batch
from megallava.data.synthetic import SyntheticConversations
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")
DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")


def _sample(n, first, n_images=0, source=None, trained_last=False):
    tokens = torch.arange(first, first + n)
    labels = torch.full((n,), IGNORE_INDEX)
    labels[:-1] = tokens[1:]
    if trained_last:  # a truncated sample: its last position predicts its own (cut) next token
        labels[-1] = first + n
    s = {"tokens": tokens, "labels": labels, "images": torch.full((n_images, 3, 2, 2), float(first))}
    if source is not None:
        s["source"] = source
    return s


def test_pack_layout_positions_segments_and_boundaries():
    lengths = [5, 3, 7, 2, 1]
    # first-fit in order into rows of 10: 5+3 -> row 0, 7 -> row 1, 2 fills row 0, 1 goes to row 1
    assert pack_rows(lengths, 10) == [[0, 1, 3], [2, 4]]
    samples = [_sample(n, 100 * (i + 1), n_images=int(i in (2, 3)), source=i % 2) for i, n in enumerate(lengths)]
    b = pack(samples, 10, pad_multiple=4)
    assert b["tokens"].shape == (2, 12)  # longest row 10, rounded up to a multiple of 4
    assert b["sample_rows"] == [0, 0, 1, 0, 1] and b["sample_offsets"] == [0, 5, 0, 8, 7]
    assert b["lengths"] == lengths and b["num_images"] == 2
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 0]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0]
    assert b["segment_ids"][0].tolist() == [1] * 5 + [2] * 3 + [3] * 2 + [0] * 2
    assert b["segment_ids"][1].tolist() == [1] * 7 + [2] + [0] * 4
    assert b["source_token_ids"][0].tolist() == [0] * 5 + [1] * 3 + [1] * 2 + [-1] * 2
    for i, s in enumerate(samples):
        r, o, n = b["sample_rows"][i], b["sample_offsets"][i], lengths[i]
        assert torch.equal(b["tokens"][r, o:o + n], s["tokens"]) and torch.equal(b["labels"][r, o:o + n], s["labels"])
        # the last token of a sample is never trained on the next sample's first token
        assert b["labels"][r, o + n - 1] == IGNORE_INDEX
    padding = b["segment_ids"] == 0
    assert (b["labels"][padding] == IGNORE_INDEX).all() and (b["tokens"][padding] == 0).all()
    # images follow their placeholders row by row: sample 3 (row 0) before sample 2 (row 1)
    assert b["images"][:, 0, 0, 0].tolist() == [400.0, 300.0]
    # a truncated sample keeps its own last label (the token that was cut off), never the next sample's first
    t = pack([_sample(4, 10, trained_last=True), _sample(3, 50)], 10)
    assert t["labels"][0, 3] == 14 and t["labels"][0, 3] != t["tokens"][0, 4]
    with pytest.raises(ValueError, match="more than seq_length"):
        pack([_sample(11, 0)], 10)
    # padding to a common [rows, length] (interleaved schedule) keeps padding inert
    p = pad_batch(b, 16, rows=3)
    assert p["tokens"].shape == p["position_ids"].shape == p["segment_ids"].shape == (3, 16)
    assert (p["segment_ids"][2] == 0).all() and (p["labels"][2] == IGNORE_INDEX).all()
    assert (p["source_token_ids"][:, 12:] == -1).all()


def test_synthetic_packed_stream_holds_the_same_samples():
    src = SyntheticConversations(5, 500, 128, 56, 16, -200, max_images_per_sample=2)
    plain = microbatch_iterator(src.sample, 1000, 8, 4, 0, 1, with_images=False)
    packed = microbatch_iterator(src.sample, 1000, 8, 4, 0, 1, with_images=False, pack_length=128)
    for _ in range(4):
        a, b = next(plain), next(packed)
        assert a["lengths"] == b["lengths"] and a["num_images"] == b["num_images"]
        assert b["tokens"].shape[0] < a["tokens"].shape[0]  # these short samples pack into fewer rows
        for i, n in enumerate(b["lengths"]):
            r, o = b["sample_rows"][i], b["sample_offsets"][i]
            assert torch.equal(a["tokens"][i, :n], b["tokens"][r, o:o + n])
            assert torch.equal(a["labels"][i, :n], b["labels"][r, o:o + n])
            assert b["labels"][r, o + n - 1] == IGNORE_INDEX  # untruncated synthetic samples end untrained


def test_packed_losses_equal_unpacked_per_token():
    """TP1, fp32: every token's loss in packed rows equals its loss in the sample's own unpacked row, for samples
    with 0, 1 and 2 images, image samples also in second and third place of a row (positions restart there)."""
    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks

        cfg = C.load_config(TINY, ["parallel.tp=1", "parallel.pp=1"])
        init_distributed(1, 1, None, 1, env)
        chunk = build_chunks(cfg)[0].eval()
        src = SyntheticConversations(3, cfg.model.vocab_size, 128, 56, 16, cfg.model.image_token_id,
                                     max_images_per_sample=2)
        samples = [src.sample(i) for i in range(10)]
        plain, packed = collate(samples), pack(samples, 128)
        seen = []  # what the decoder receives: RoPE angles and the attention mask
        chunk.decoder.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append((kwargs["rotary_pos_emb"], kwargs["attention_mask"])),
            with_kwargs=True)
        with torch.no_grad():
            ref = chunk(tokens=plain["tokens"], images=plain["images"], labels=plain["labels"])
            got = chunk(tokens=packed["tokens"], images=packed["images"], labels=packed["labels"],
                        position_ids=packed["position_ids"], segment_ids=packed["segment_ids"])
        return samples, packed, ref, got, seen

    samples, packed, ref, got, seen = run_ranks(1, fn)[0]
    (rope_ref, mask_ref), (rope, mask) = seen
    assert mask_ref is None and rope_ref.shape[1:3] == (1, 1)  # unpacked: plain causal attention, shared angles
    rows, s = packed["tokens"].shape
    assert rope.shape[:3] == (s, rows, 1) and mask.shape == (rows, 1, s, s) and mask.dtype == torch.bool
    n_images = [s["images"].shape[0] for s in samples]
    assert {0, 1, 2} <= set(n_images)
    assert any(n and packed["sample_offsets"][i] > 0 for i, n in enumerate(n_images))
    assert packed["tokens"].shape[0] < len(samples)
    trained = 0
    for i, s in enumerate(samples):
        r, o, n = packed["sample_rows"][i], packed["sample_offsets"][i], s["tokens"].numel()
        torch.testing.assert_close(got[r, o:o + n], ref[i, :n], rtol=0, atol=1e-5)
        # RoPE restarts at 0 for each sample: exactly the angles of its unpacked row. (Under the mask, shifted
        # positions would change the loss only by rounding, as RoPE is relative: hence checked directly.)
        assert torch.equal(rope[o:o + n, r], rope_ref[:n, 0])
        # a token attends to the earlier tokens of its own sample only (True = masked out)
        allowed = ~mask[r, 0, o:o + n]
        assert torch.equal(allowed[:, o:o + n], torch.ones(n, n, dtype=torch.bool).tril())
        assert not allowed[:, :o].any() and not allowed[:, o + n:].any()
        trained += int((s["labels"] >= 0).sum())
    assert (ref > 0).sum() == trained and (got > 0).sum() == trained  # every trained token has a loss, no other


def _train(world, overrides, run_dir, base_config=TINY, extra=()):
    base = ["train.iters=3", "train.global_batch_size=8", "train.micro_batch_size=4", f"train.run_dir={run_dir}",
            "parallel.tp=1", "parallel.pp=1", *extra]

    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(base_config, base + overrides)
        C.validate(cfg, env.world_size)
        return run(cfg, env)

    return run_ranks(world, fn)[0]


PACKED_LAYOUTS = {
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "pp2vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),  # middle chunks read data; rows padded to a common count
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
}


def test_packed_training_matches_unpacked_and_across_layouts(tmp_path):
    ref = _train(1, ["data.packing=true"], tmp_path / "ref")
    losses = [r["loss"] for r in ref]
    assert losses[0] > losses[-1] > 0
    plain = _train(1, [], tmp_path / "plain")
    for r, p in zip(ref, plain):  # the same samples per step, only grouped into rows differently
        assert r["loss"] == pytest.approx(p["loss"], rel=1e-4)
        assert (r["trained_tokens"], r["tokens"], r["images"]) == (p["trained_tokens"], p["tokens"], p["images"])
    for name, (world, layout) in PACKED_LAYOUTS.items():
        got = _train(world, ["data.packing=true"] + layout, tmp_path / name)
        for r, g in zip(ref, got):
            assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), name
            assert g["trained_tokens"] == r["trained_tokens"], name

def _demo_overrides(demo_data):
    return [f"data.tokenizer={demo_data}/tokenizer.model",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]", "data.num_workers=0"]


def test_packed_demo_shards_per_source_losses(demo_data, tmp_path):
    extra = _demo_overrides(demo_data)
    ref = _train(1, ["data.packing=true"], tmp_path / "ref", DEMO, extra)
    plain = _train(1, [], tmp_path / "plain", DEMO, extra)
    got = _train(4, ["data.packing=true", "parallel.tp=2", "parallel.pp=2"], tmp_path / "tp2pp2", DEMO, extra)
    assert ref[0]["trained_tokens/instruct"] > 0 and ref[0]["trained_tokens/sharegpt"] > 0 and ref[0]["images"] > 0
    for r, p, g in zip(ref, plain, got):
        for key in ("loss", "loss/instruct", "loss/sharegpt"):
            assert r[key] == pytest.approx(p[key], rel=1e-4), key
            assert g[key] == pytest.approx(r[key], rel=1e-5), key
        for key in ("trained_tokens", "trained_tokens/instruct", "trained_tokens/sharegpt", "tokens", "images"):
            assert r[key] == p[key] == g[key], key


def _padding(batches):
    """(padded positions, real tokens) over micro-batches."""
    return (sum(b["tokens"].numel() - sum(b["lengths"]) for b in batches), sum(sum(b["lengths"]) for b in batches))


def test_packing_reduces_padding_llava_shapes():
    """LLaVA-1.5-like shapes: 576 image tokens per image (336 px), 25% language-only samples, seq_length 2048,
    16 samples per micro-batch."""
    src = SyntheticConversations(0, 32000, 2048, 336, 576, -200, text_only_fraction=0.25)
    plain = microbatch_iterator(src.sample, 10 ** 6, 128, 16, 0, 1, with_images=False)
    packed = microbatch_iterator(src.sample, 10 ** 6, 128, 16, 0, 1, with_images=False, pack_length=2048)
    (pad_plain, real), (pad_packed, real_packed) = (_padding([next(it) for _ in range(8)]) for it in (plain, packed))
    assert real == real_packed
    # measured: 19897 -> 7471 padded positions for 58071 real tokens (25.5% -> 11.4% of all positions)
    assert pad_packed < 0.45 * pad_plain, (pad_plain, pad_packed, real)


def test_packing_reduces_padding_demo_shards(demo_data):
    """The demo shards' real conversations (instruct 3 : sharegpt 1) at the demo's seq_length 256, 16 samples per
    micro-batch."""
    from megallava.data.loader import MicroBatches

    def padding(packing):
        cfg = C.load_config(DEMO, _demo_overrides(demo_data) + ["train.micro_batch_size=16",
                                                                "train.global_batch_size=64"])
        ds = MicroBatches(cfg, 0, 1, with_images=False, packing=packing)
        return _padding([ds[q] for q in range(16)])

    (pad_plain, real), (pad_packed, real_packed) = padding(False), padding(True)
    assert real == real_packed
    # measured: 15881 -> 5892 padded positions for 29559 real tokens (35% -> 17% of all positions)
    assert pad_packed < 0.45 * pad_plain, (pad_plain, pad_packed, real)

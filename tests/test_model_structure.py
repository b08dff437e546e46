"""Where parameters live under pipeline parallelism, and when the vision tower runs."""
import os

import pytest
import torch

from megallava import config as C
from megallava.model.init import unwrap
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")


def expected_counts(cfg):
    """Parameter counts of each part at TP1, from the config (CLIP / LLaMA / projector formulas)."""
    m, v = cfg.model, cfg.model.vision
    hv, fv, h, f = v.hidden_size, v.ffn_hidden_size, m.hidden_size, m.ffn_hidden_size
    patches = (v.image_size // v.patch_size) ** 2
    vit_layer = 4 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + (fv * hv + fv) + (hv * fv + hv)
    vision = 3 * v.patch_size ** 2 * hv + hv + (patches + 1) * hv + 2 * hv + (v.num_layers - 1) * vit_layer
    projector = hv * h + h + h * h + h
    kv = (m.num_query_groups or m.num_attention_heads) * (h // m.num_attention_heads)
    llm_layer = 2 * h + (h + 2 * kv) * h + h * h + 3 * f * h
    padded_vocab = 1024  # 500 padded to a multiple of 128 * lcm(tp, 8)
    return {"vision": vision, "projector": projector, "embedding": padded_vocab * h, "layer": llm_layer,
            "final_norm": h, "output": padded_vocab * h}


def _stage_params(overrides, world):
    def fn(rank, env):
        from megatron.core import parallel_state
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks

        cfg = C.load_config(TINY, overrides)
        init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, 1, env)
        chunks = build_chunks(cfg)
        counts = {}
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                part = name.split(".")[0]
                counts[part] = counts.get(part, 0) + p.numel()
        return parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(), \
            counts, [len(c.decoder.layers) for c in chunks]

    return run_ranks(world, fn)


def test_vision_and_projector_only_on_first_stage_pp2():
    cfg = C.load_config(TINY, ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_layers=[1,3]"])
    exp = expected_counts(cfg)
    (pp0, _, c0, layers0), (pp1, _, c1, layers1) = _stage_params(
        ["parallel.tp=1", "parallel.pp=2", "parallel.pipeline_layers=[1,3]"], 2)
    assert (pp0, pp1, layers0, layers1) == (0, 1, [1], [3])
    assert c0 == {"vision": exp["vision"], "projector": exp["projector"], "embedding": exp["embedding"],
                  "decoder": exp["layer"]}
    assert c1 == {"decoder": 3 * exp["layer"] + exp["final_norm"], "output_layer": exp["output"]}


def test_vision_only_on_first_stage_tp2pp2_vpp2():
    results = _stage_params(["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2"], 4)
    for pp_rank, tp_rank, counts, layers in results:
        assert layers == [1, 1]
        if pp_rank == 0:
            assert {"vision", "projector", "embedding"} <= set(counts) and "output_layer" not in counts
        else:
            assert not {"vision", "projector", "embedding"} & set(counts) and "output_layer" in counts
    # TP halves the sharded weights: both TP ranks of stage 0 hold the same number of vision parameters.
    stage0 = [c["vision"] for pp, _, c, _ in results if pp == 0]
    assert stage0[0] == stage0[1] < expected_counts(C.load_config(TINY))["vision"]


@pytest.mark.parametrize("text_only_fraction,expect_calls", [(1.0, False), (0.0, True)])
def test_text_only_microbatches_never_run_the_vit(text_only_fraction, expect_calls, tmp_path):
    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(TINY, ["parallel.tp=1", "parallel.pp=1", "train.iters=2", f"train.run_dir={tmp_path}",
                                   f"data.text_only_fraction={text_only_fraction}"])
        calls = []
        run(cfg, env, on_iteration=lambda it, model, out: calls.append(unwrap(model[0]).vision_calls))
        return calls

    calls = run_ranks(1, fn)[0]
    if expect_calls:
        assert calls[-1] == 8  # 2 iterations x 4 micro-batches, each with images
    else:
        assert calls == [0, 0]


def test_placeholder_count_must_match_images():
    def fn(rank, env):
        from megallava.distributed import init_distributed
        from megallava.model.build import build_chunks

        cfg = C.load_config(TINY, ["parallel.tp=1", "parallel.pp=1"])
        init_distributed(1, 1, None, 1, env)
        chunk = build_chunks(cfg)[0]
        tokens = torch.full((1, 20), 5)
        tokens[0, 1:5] = cfg.model.image_token_id  # 4 placeholders, but one image has 16 features
        with pytest.raises(ValueError, match="4 image placeholder tokens but 1 images x 16 features"):
            chunk(tokens=tokens, images=torch.zeros(1, 3, 56, 56))
        return True

    assert run_ranks(1, fn) == [True]

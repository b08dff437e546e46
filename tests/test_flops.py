"""Model FLOPs (training/flops.py) against numbers worked out by hand for a small shape, and the throughput maths."""
import resource

import pytest
import torch

from megallava import config as C
from megallava.training import flops as F
from tests.multirank import run_ranks

# LLM: 2 layers, h 8, 2 heads, 1 kv head (GQA), ffn 12, vocab 10. ViT: 28 px / patch 14 = 4 patches (+CLS = 5
# tokens), hidden 4, ffn 6, 3 layers with select_layer -2 -> 2 layers built.
SMALL = ["model.num_layers=2", "model.hidden_size=8", "model.num_attention_heads=2", "model.num_query_groups=1",
         "model.ffn_hidden_size=12", "model.vocab_size=10", "model.vision.image_size=28",
         "model.vision.patch_size=14", "model.vision.hidden_size=4", "model.vision.ffn_hidden_size=6",
         "model.vision.num_layers=3", "model.vision.num_attention_heads=2", "model.vision.select_layer=-2"]

# --- hand arithmetic, forward ---
# LLM per token per layer: qkv 8*(8 + 2*8*1/2) = 128, o 8*8 = 64, SwiGLU 3*8*12 = 288; 2*(128+64+288) = 960.
# Two layers 1920, logits 2*8*10 = 160 -> 2080 per token.
# Causal attention per sample per layer: s * 4*(s/2)*8 = 16*s^2  ->  s=6: 576, s=3: 144.
LLM_FWD_6_3 = 9 * 2080 + 2 * (576 + 144)                    # samples of length 6 and 3: 18720 + 1440 = 20160
LLM_FWD_3_3 = 6 * 2080 + 2 * (144 + 144)                    # two text-only samples of length 3: 13056
# ViT per layer per token: 2*(4*4*4) = 128 (qkv + o), 2*(2*4*6) = 96 (fc1 + fc2), attention 4*5*4 = 80 -> 304;
# x 5 tokens x 2 layers = 3040; patch embedding 4 patches * 2*(3*14*14)*4 = 18816.
VIT_FWD = 3040 + 18816                                      # 21856 per image
# Projector per image feature: mlp2x 2*(4*8 + 8*8) = 192, linear 2*4*8 = 64; 4 features per image.
MLP2X_FWD, LINEAR_FWD = 4 * 192, 4 * 64                     # 768, 256 per image


def cfg(*extra):
    return C.load_config(None, SMALL + list(extra))


def test_stage2_default_llm_and_projector_train_vit_frozen():
    f = F.step_flops(cfg(), [6, 3], num_images=1)
    assert f["llm"] == 3 * LLM_FWD_6_3 == 60480
    assert f["vit"] == 1 * VIT_FWD == 21856
    assert f["projector"] == 3 * MLP2X_FWD == 2304
    assert f["total"] == 60480 + 21856 + 2304


def test_text_only_batch_has_no_vision_flops():
    f = F.step_flops(cfg(), [3, 3], num_images=0)
    assert f["vit"] == 0 and f["projector"] == 0
    assert f["llm"] == f["total"] == 3 * LLM_FWD_3_3 == 39168


def test_trainable_vit_costs_3x():
    frozen, trained = F.step_flops(cfg(), [6, 3], 1), F.step_flops(cfg("model.train_vision=true"), [6, 3], 1)
    assert frozen["vit"] == VIT_FWD and trained["vit"] == 3 * VIT_FWD
    assert trained["llm"] == frozen["llm"] and trained["projector"] == frozen["projector"]


def test_stage1_frozen_llm_costs_2x():
    f = F.step_flops(cfg("model.train_llm=false"), [6, 3], 1)
    assert f["llm"] == 2 * LLM_FWD_6_3 == 40320       # activation grads only, back to the projector
    assert f["projector"] == 3 * MLP2X_FWD and f["vit"] == VIT_FWD


def test_frozen_projector_under_a_trained_vit_costs_2x():
    f = F.step_flops(cfg("model.train_projector=false", "model.train_vision=true"), [6, 3], 1)
    assert f["projector"] == 2 * MLP2X_FWD and f["vit"] == 3 * VIT_FWD


def test_linear_vs_mlp2x_projector():
    assert F.step_flops(cfg("model.projector=linear"), [6, 3], 2)["projector"] == 2 * 3 * LINEAR_FWD == 1536
    assert F.step_flops(cfg("model.projector=mlp2x_gelu"), [6, 3], 2)["projector"] == 2 * 3 * MLP2X_FWD == 4608


def test_additive_over_samples_so_ranks_can_sum():
    c = cfg()
    whole = F.step_flops(c, [6, 3, 5, 2], 3)
    parts = [F.step_flops(c, [6, 3], 2), F.step_flops(c, [5, 2], 1)]
    for k in whole:
        assert whole[k] == pytest.approx(sum(p[k] for p in parts), rel=1e-12)


def test_vit_l14_336_matches_the_published_0_38_tflop_per_image():
    c = C.load_config(None, ["model.vision.select_layer=-1"])  # all 24 layers of ViT-L/14-336
    assert F.step_flops(c, [], 1)["vit"] == pytest.approx(0.38e12, rel=0.02)


def test_throughput_and_mfu_arithmetic():
    flops = {"llm": 1.5e12, "vit": 0.4e12, "projector": 0.1e12, "total": 2e12}
    out = F.throughput(flops, tokens=8192, step_time_s=0.5, world_size=2, peak_tflops=989.0)
    assert out["tokens_per_s"] == pytest.approx(16384)          # whole job
    assert out["tflops_per_gpu"] == pytest.approx(2.0)          # 2e12 / 0.5 s / 2 GPUs
    assert out["mfu"] == pytest.approx(2.0 / 989.0)
    assert F.throughput(flops, 8192, 0.5, 2, None)["mfu"] is None


def test_peak_tflops(monkeypatch):
    assert F.peak_tflops_per_gpu(500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert F.peak_tflops_per_gpu() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert F.peak_tflops_per_gpu() == peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path: peak RSS")
def test_peak_memory_is_rss_on_cpu():
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    assert 0 < F.peak_memory_gib() == pytest.approx(rss_gib, rel=0.05)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_step_metrics_sums_over_data_parallel_replicas_once(tp, pp):
    """4 ranks: each DP replica's first stage reads different samples; TP peers read the same ones and must not be
    counted twice; later pipeline stages read none. The reduced FLOPs equal those of the whole global batch."""
    replica_batches = {0: [{"lengths": [6, 3], "num_images": 1}, {"lengths": [5], "num_images": 0}],
                       1: [{"lengths": [2, 2], "num_images": 2}]}

    def fn(rank, env):
        from megatron.core import parallel_state
        from megallava.distributed import init_distributed

        init_distributed(tp, pp, None, 1, env)
        counter = None
        if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
            counter = F.BatchCounter(iter(replica_batches[parallel_state.get_data_parallel_rank()]))
            list(counter)  # the step consumes its micro-batches
        return F.step_metrics(cfg(), counter, step_time_s=2.0, peak_tflops=None)

    results = run_ranks(4, fn)
    whole = F.step_flops(cfg(), [6, 3, 5, 2, 2], 3)
    for r in results:
        assert r == results[0]
    r = results[0]
    assert (r["tokens"], r["images"], r["mfu"]) == (18, 3, None)
    assert r["tokens_per_s"] == pytest.approx(9.0)
    assert r["tflops_per_gpu"] == pytest.approx(whole["total"] / 2.0 / 4 / 1e12)
    assert r["tflops_llm"] + r["tflops_vit"] + r["tflops_projector"] == pytest.approx(r["tflops_per_gpu"])
    assert r["tflops_vit"] == pytest.approx(whole["vit"] / 2.0 / 4 / 1e12)
    assert r["mem_gib"] > 0

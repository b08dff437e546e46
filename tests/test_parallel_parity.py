"""Layout parity: the same seed, data and weights give the same losses, gradients and updated weights at every
TP x PP x VPP x DP layout (fp32, no dropout). All runs are multi-rank on CPU with gloo."""
import os

import pytest
import torch

from megallava import config as C
from megallava.model.layout import assemble, local_pieces
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")
NAMES = ("embedding.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
         "decoder.layers.3.mlp.linear_fc1.weight", "decoder.layers.2.mlp.linear_fc2.weight",
         "decoder.final_layernorm.weight", "output_layer.weight", "projector.linear_1.weight",
         "projector.linear_2.bias")
ITERS = 3


def train_layout(world_size, overrides, tmp_path):
    base = [f"train.iters={ITERS}", "train.global_batch_size=8", "train.micro_batch_size=2",
            f"train.run_dir={tmp_path}/run", "parallel.tp=1", "parallel.pp=1"]

    def fn(rank, env):
        from megatron.core import parallel_state
        from megallava.training.optimizer import sync_params
        from megallava.training.train import run

        cfg = C.load_config(TINY, base + overrides)
        C.validate(cfg, env.world_size)
        captured = {}

        def hook(iteration, model, out):
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            if iteration == 1:
                captured["grads"] = local_pieces(model, NAMES, tp_rank, use_main_grad=True)
            if iteration == ITERS:
                sync_params(model, cfg)  # overlap_param_gather: the update reaches the model with the next gather
                captured["weights"] = local_pieces(model, NAMES, tp_rank)
            captured["dp_rank"] = parallel_state.get_data_parallel_rank()

        records = run(cfg, env, on_iteration=hook)
        return {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records], **captured}

    results = run_ranks(world_size, fn)
    vocab = C.load_config(TINY).model.vocab_size
    dp0 = [r for r in results if r["dp_rank"] == 0]
    return {"losses": results[0]["losses"], "grad_norms": results[0]["grad_norms"],
            "grads": assemble([r["grads"] for r in dp0], vocab),
            "weights": assemble([r["weights"] for r in results], vocab)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_layout(1, [], tmp_path_factory.mktemp("ref"))


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"], True),
    "pp2": (2, ["parallel.pp=2"], True),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"], True),
    "pp2vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"], True),
    "dp2_distopt": (2, ["parallel.use_distributed_optimizer=true"], False),
    "pp2_uneven": (2, ["parallel.pp=2", "parallel.pipeline_layers=[1,3]"], True),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], True),
    "tp2pp2dp2_distopt_sp": (8, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"], False),
    # activation recompute: the same math, rerun in backward
    "tp2pp2_recompute_full": (4, ["parallel.tp=2", "parallel.pp=2", "train.recompute=full"], True),
    "tp2_sp_recompute_selective": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=selective",
                                       "train.recompute_modules=[core_attn, mlp]"], True),
    # megatron DDP's overlapped grad reduce-scatter and param all-gather (multi-GPU settings), here on gloo
    "dp2_overlap": (2, ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"], False),
    "pp2dp2_overlap": (4, ["parallel.pp=2", "parallel.overlap_grad_reduce=true",
                           "parallel.overlap_param_gather=true"], False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(layout, reference, tmp_path):
    world, overrides, grads_full = LAYOUTS[layout]
    got = train_layout(world, overrides, tmp_path)
    ref_losses = torch.tensor(reference["losses"], dtype=torch.float64)
    losses = torch.tensor(got["losses"], dtype=torch.float64)
    assert ref_losses[0] > ref_losses[-1] > 0  # training moves, so equal losses mean something
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=1e-4, atol=1e-6)
    for name in NAMES:
        # Adam divides by sqrt(v): a near-zero grad turns float-rounding noise into a visible update, so compare
        # weights to 1e-5 absolute (0.3% of one lr=3e-3 step) rather than relatively.
        torch.testing.assert_close(got["weights"][name], reference["weights"][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{layout}: weight {name} after {ITERS} iterations: {m}")
        if grads_full:  # with DP > 1 the distributed optimizer keeps only this rank's grad shard
            torch.testing.assert_close(got["grads"][name], reference["grads"][name], rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{layout}: grad of {name}: {m}")


STAGE1 = ["model.train_llm=false"]  # projector alignment: ViT and LLM frozen


def test_stage1_projector_only_matches_across_layouts(tmp_path):
    """Stage 1 at PP2: the second stage holds no trainable parameter at all, yet gradients flow through it to the
    projector on stage 0; losses match TP1 and only the projector moves."""
    ref = train_layout(1, STAGE1, tmp_path / "ref")
    got = train_layout(4, STAGE1 + ["parallel.tp=2", "parallel.pp=2"], tmp_path / "tp2pp2")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    assert ref["losses"][0] > ref["losses"][-1]
    init = train_layout(1, STAGE1 + ["train.lr=1e-30", "train.min_lr=0"], tmp_path / "init")  # ~unchanged weights
    for name in NAMES:
        moved = not torch.allclose(got["weights"][name], init["weights"][name], rtol=0, atol=1e-7)
        assert moved == name.startswith("projector."), f"{name}: moved={moved} in stage 1"

"""The paper's recipe across its seams: stage 1 (projector only) saves and resumes bitwise at every layout, stage 2
starts from it with checkpoint.finetune (or checkpoint.pretrained, which a requeue does not repeat), LoRA / QLoRA stage 2 saves only what it trains on top of its base and
resumes bitwise; the guards around loading (auto, overwrite, nothing left to train)."""
import os

import pytest
import torch

from megallava import config as C
from megallava.model.layout import assemble, local_pieces
from tests.multirank import run_ranks

TINY = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "tiny_cpu.yaml")
BASE = ["parallel.tp=1", "parallel.pp=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr_warmup_fraction=0",
        "train.lr_decay_style=linear"]
NAMES = ("projector.linear_1.weight", "decoder.layers.1.mlp.linear_fc1.weight", "embedding.weight",
         "decoder.layers.0.self_attention.linear_qkv.lora_b", "decoder.layers.3.mlp.linear_fc2.lora_a")


def train(world, overrides, run_dir, expect_error=None):
    def fn(rank, env):
        from megatron.core import parallel_state
        from megallava.training.train import run

        cfg = C.load_config(TINY, BASE + [f"train.run_dir={run_dir}"] + overrides)
        C.validate(cfg, env.world_size)
        seen = {"weights": {}}

        def hook(iteration, model, out):
            if iteration == getattr(hook, "first", iteration):
                hook.first = iteration
                seen["first_weights"] = local_pieces(model, NAMES, parallel_state.get_tensor_model_parallel_rank())
            seen["weights"] = local_pieces(model, NAMES, parallel_state.get_tensor_model_parallel_rank())

        try:
            records = run(cfg, env, on_iteration=hook)
        except Exception as err:  # noqa: BLE001
            if expect_error is None:
                raise
            return {"error": str(err)}
        return {"records": records, "preempted": records.preempted, **seen}

    results = run_ranks(world, fn)
    if expect_error is not None:
        assert all("error" in r for r in results), results
        assert expect_error in results[0]["error"], results[0]["error"]
        return results[0]["error"]
    vocab = C.load_config(TINY).model.vocab_size
    return {"losses": [r["loss"] for r in results[0]["records"]],
            "iterations": [r["iteration"] for r in results[0]["records"]],
            "lrs": [r["lr"] for r in results[0]["records"]],
            "weights": assemble([r["weights"] for r in results], vocab),
            "first_weights": assemble([r["first_weights"] for r in results], vocab)}


STAGE1 = ["model.train_llm=false", "train.lr=3e-3"]
LAYOUTS = {"tp1pp2": (2, ["parallel.tp=1", "parallel.pp=2"]),
           "tp1pp2_no_distopt": (2, ["parallel.tp=1", "parallel.pp=2", "parallel.use_distributed_optimizer=false"]),
           "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
           "tp2pp2_no_distopt": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.use_distributed_optimizer=false"])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stage1_saves_and_resumes_bitwise_at_pp(layout, tmp_path):
    """Later pipeline stages hold no trainable parameter in stage 1: saving used to fail there. The checkpoint
    exports (megatron-to-hf) to a model transformers loads, holding the trained projector and the frozen LLM."""
    world, lay = LAYOUTS[layout]
    lay = lay + ["model.image_token_id=499"]  # in the vocab: the export is a llava-hf model
    full = train(world, STAGE1 + lay + ["train.iters=4"], tmp_path / "full")
    ck = f"checkpoint.dir={tmp_path}/ck"
    first = train(world, STAGE1 + lay + ["train.iters=4", "train.exit_interval=2", ck], tmp_path / "a")
    rest = train(world, STAGE1 + lay + ["train.iters=4", ck, "checkpoint.load=auto"], tmp_path / "a")
    assert first["iterations"] == [1, 2] and rest["iterations"] == [3, 4]
    assert first["losses"] + rest["losses"] == full["losses"]
    for name in ("projector.linear_1.weight", "decoder.layers.1.mlp.linear_fc1.weight"):
        assert torch.equal(rest["weights"][name], full["weights"][name])
    assert len(open(tmp_path / "a" / "metrics.jsonl").readlines()) == 4  # one history, no duplicated iterations
    from transformers import LlavaForConditionalGeneration
    from megallava.convert.megatron_to_hf import megatron_to_hf

    out = str(tmp_path / "hf")
    exported = megatron_to_hf(str(tmp_path / "ck"), out, weights_only=True, log=lambda *a, **k: None)
    assert exported["format"] == "llava-hf"
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.image_token_id == 499
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, rest["weights"]["projector.linear_1.weight"])
    mlp = hf.model.language_model.layers[1].mlp
    assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                       rest["weights"]["decoder.layers.1.mlp.linear_fc1.weight"])
    assert torch.equal(hf.model.language_model.embed_tokens.weight, rest["weights"]["embedding.weight"])


def test_stage2_finetunes_from_stage1_and_guards(tmp_path):
    s1 = train(2, STAGE1 + ["parallel.pp=2", "train.iters=3", f"checkpoint.dir={tmp_path}/s1"], tmp_path / "r1")
    # without finetune, a checkpoint at iteration 3 with train.iters=3 has nothing left: an error naming the fix
    train(1, ["train.iters=3", f"checkpoint.load={tmp_path}/s1"], tmp_path / "r2x", expect_error="checkpoint.finetune")
    s2 = train(1, ["train.iters=3", f"checkpoint.load={tmp_path}/s1", "checkpoint.finetune=true", "train.lr=1e-30",
                   "train.min_lr=0"], tmp_path / "r2")
    assert s2["iterations"] == [1, 2, 3]  # iteration 0, the full schedule
    for name in ("projector.linear_1.weight", "decoder.layers.1.mlp.linear_fc1.weight", "embedding.weight"):
        torch.testing.assert_close(s2["first_weights"][name], s1["weights"][name], rtol=0, atol=1e-20)
    full_lr = train(1, ["train.iters=3", f"checkpoint.load={tmp_path}/s1", "checkpoint.finetune=true",
                        "train.lr=1e-3", f"checkpoint.dir={tmp_path}/s2", "checkpoint.interval=1"], tmp_path / "r3")
    assert full_lr["lrs"][0] == pytest.approx(1e-3)  # fresh scheduler (warm-up 0): starts at the peak
    # fresh optimizer: after stage 2's first step Adam counts 1 step (stage 1 saved 3), and both moments started
    # from zero: exp_avg = (1 - b1) g, exp_avg_sq = (1 - b2) g^2, so exp_avg^2 / exp_avg_sq = 0.01 / 0.001 = 10
    from megatron.core import dist_checkpointing
    from megallava.convert.dcp import CheckpointReader

    def adam(ckpt):
        groups = dist_checkpointing.load_common_state_dict(str(ckpt))["optimizer"]["optimizer"]["param_groups"]
        reader = CheckpointReader(str(ckpt))
        m, v = (reader.read(f"optimizer.state.{k}.projector.linear_1.weight") for k in ("exp_avg", "exp_avg_sq"))
        ratio = (m.double() ** 2 / v.double())[v > 0]
        return {g["step"] for g in groups}, ratio

    steps, ratio = adam(tmp_path / "s2" / "iter_0000001")
    assert steps == {1} and ratio.numel() > 1000
    torch.testing.assert_close(ratio, torch.full_like(ratio, 10.0), rtol=1e-4, atol=0)
    s1_steps, s1_ratio = adam(tmp_path / "s1" / "iter_0000003")
    assert s1_steps == {3} and (s1_ratio - 10).abs().max() > 1  # the stage-1 state it did not load
    # a run that would start over a checkpoint.dir with checkpoints refuses unless asked
    train(1, ["train.iters=3", f"checkpoint.dir={tmp_path}/s1"], tmp_path / "r4", expect_error="checkpoint.overwrite")


def test_load_projector_puts_a_stage1_projector_on_another_base(tmp_path):
    """checkpoint.load_projector (LLaVA's --pretrain_mm_mlp_adapter): stage 2 starts with the base checkpoint's LLM
    (and ViT) and the stage-1 checkpoint's projector."""
    s1 = train(1, STAGE1 + ["train.iters=2", f"checkpoint.dir={tmp_path}/s1"], tmp_path / "r1")
    base = train(1, ["train.iters=1", "train.seed=7", f"checkpoint.dir={tmp_path}/base"], tmp_path / "rb")
    s2 = train(1, ["train.iters=1", f"checkpoint.load={tmp_path}/base", "checkpoint.finetune=true",
                   f"checkpoint.load_projector={tmp_path}/s1", "train.lr=1e-30", "train.min_lr=0"], tmp_path / "r2")
    first = s2["first_weights"]
    torch.testing.assert_close(first["projector.linear_1.weight"], s1["weights"]["projector.linear_1.weight"],
                               rtol=0, atol=1e-20)
    for name in ("decoder.layers.1.mlp.linear_fc1.weight", "embedding.weight"):
        torch.testing.assert_close(first[name], base["weights"][name], rtol=0, atol=1e-20)
        assert (base["weights"][name] - s1["weights"][name]).abs().max() > 1e-3  # the two sources differ
    projector = "projector.linear_1.weight"
    assert (base["weights"][projector] - s1["weights"][projector]).abs().max() > 1e-3

    # checkpoint.pretrained (Megatron's --pretrained-checkpoint): one command line for the first start and every
    # requeue. The first start (checkpoint.dir empty) is exactly the fixed checkpoint.load + finetune start; a
    # requeue resumes its own checkpoint: not the pretrained weights again, nor the stage-1 projector over the
    # trained one, and it reproduces the uninterrupted run bitwise.
    stage2 = ["train.iters=4", "checkpoint.load=auto", f"checkpoint.pretrained={tmp_path}/base",
              f"checkpoint.load_projector={tmp_path}/s1"]
    fixed = train(1, ["train.iters=4", f"checkpoint.load={tmp_path}/base", "checkpoint.finetune=true",
                      f"checkpoint.load_projector={tmp_path}/s1"], tmp_path / "fixed")
    full = train(1, stage2 + [f"checkpoint.dir={tmp_path}/full"], tmp_path / "full")
    assert full["iterations"] == [1, 2, 3, 4] and full["losses"] == fixed["losses"]
    first = train(1, stage2 + [f"checkpoint.dir={tmp_path}/rq", "train.exit_interval=2"], tmp_path / "rq")
    again = train(1, stage2 + [f"checkpoint.dir={tmp_path}/rq"], tmp_path / "rq")
    assert first["iterations"] == [1, 2] and again["iterations"] == [3, 4]
    assert first["losses"] + again["losses"] == full["losses"]
    for name in NAMES[:3]:
        assert torch.equal(again["weights"][name], full["weights"][name]), name


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    train(1, STAGE1 + ["train.iters=2", f"checkpoint.dir={d}/ck"], d / "run")
    return d / "ck"


def test_lora_checkpoint_refuses_a_replaced_base(tmp_path):
    """A LoRA checkpoint records its base's identity: a different base put at that path is refused, naming both."""
    import shutil

    one = ["train.iters=2", "model.train_llm=false"]
    train(1, one + [f"checkpoint.dir={tmp_path}/base"], tmp_path / "b1")
    train(1, one + ["train.seed=7", f"checkpoint.dir={tmp_path}/other"], tmp_path / "b2")
    base = tmp_path / "base" / "iter_0000002"
    lora = ["lora.rank=4", f"checkpoint.dir={tmp_path}/lora"]
    train(1, lora + ["train.iters=2", f"checkpoint.load={base}", "checkpoint.finetune=true"], tmp_path / "l1")
    resume = lora + ["train.iters=3", "checkpoint.load=auto"]
    assert train(1, resume, tmp_path / "l2")["iterations"] == [3]  # the untouched base resumes
    shutil.rmtree(base)
    shutil.copytree(tmp_path / "other" / "iter_0000002", base)
    err = train(1, lora + ["train.iters=4", "checkpoint.load=auto"], tmp_path / "l3",
                expect_error="now holds other files")
    assert str(base) in err and "checkpoint.finetune=true" in err


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_lora_stage2_saves_adapters_and_resumes_bitwise(stage1, quantize, tmp_path):
    lora = ["lora.rank=4", "train.lr=1e-2", f"lora.quantize={str(quantize).lower()}", "parallel.tp=2",
            "parallel.pp=2", f"checkpoint.load={stage1}", "checkpoint.finetune=true"]
    full = train(4, lora + ["train.iters=4"], tmp_path / "full")
    first = train(4, lora + ["train.iters=4", "train.exit_interval=2", f"checkpoint.dir={tmp_path}/ck"],
                  tmp_path / "a")
    rest = train(4, [x for x in lora if not x.startswith("checkpoint.")] + [
        "train.iters=4", f"checkpoint.dir={tmp_path}/ck", "checkpoint.load=auto"], tmp_path / "a")
    assert first["losses"] + rest["losses"] == full["losses"]
    assert full["losses"][-1] < full["losses"][0]
    # the LoRA checkpoint holds adapters + projector (+ their optimizer state), not the frozen base it names
    from megallava.training.fingerprint import saved_shapes
    from megatron.core import dist_checkpointing

    keys = set(saved_shapes(str(tmp_path / "ck" / "iter_0000002")))
    assert {"decoder.layers.self_attention.linear_qkv.lora_a", "projector.linear_1.weight"} <= keys
    assert not keys & {"embedding.weight", "decoder.layers.mlp.linear_fc1.weight", "output_layer.weight"}
    common = dist_checkpointing.load_common_state_dict(str(tmp_path / "ck" / "iter_0000002"))
    assert common["lora_base"] == os.path.abspath(os.path.join(stage1, "iter_0000002"))
    # frozen weights never move
    assert torch.equal(full["weights"]["embedding.weight"], full["first_weights"]["embedding.weight"])
    if not quantize:  # the LoRA checkpoint (and its base) load at another layout, optimizer state included
        other = train(1, [x for x in lora if not x.startswith(("checkpoint.", "parallel."))] + [
            "train.iters=4", f"checkpoint.load={tmp_path}/ck/iter_0000002", "parallel.tp=1", "parallel.pp=1"],
            tmp_path / "tp1")
        assert other["iterations"] == [3, 4]
        torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(full["losses"][2:]), rtol=1e-5, atol=0)
    if quantize:  # QLoRA trains close to LoRA on the same data
        plain = train(4, [x if not x.startswith("lora.quantize") else "lora.quantize=false" for x in lora] +
                      ["train.iters=4"], tmp_path / "plain")
        gap = max(abs(a - b) for a, b in zip(full["losses"], plain["losses"]))
        assert 0 < gap < 0.05, gap

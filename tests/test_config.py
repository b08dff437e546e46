"""megallava.config: loading (YAML + overrides, types, unknown keys) and validation messages. No torch."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megallava.config import (Config, ConfigError, data_parallel_size, dump_yaml, image_tokens_per_image,
                              load_config, num_microbatches, resolved_pipeline_layers, to_dict, validate)


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def load_error(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kw)
    return str(e.value)


def problems(overrides, world_size=1) -> str:
    """Validation message for defaults + overrides (which must load cleanly)."""
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------- loading

def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == Config()
    validate(cfg, world_size=1)
    assert image_tokens_per_image(cfg) == 576
    assert data_parallel_size(cfg, 8) == 8
    assert num_microbatches(cfg, 8) == 1
    assert resolved_pipeline_layers(cfg) is None


def test_config_module_is_cheap_to_import():
    # subprocess: other test modules in the same session may already have imported torch
    code = "import sys, megallava.config; assert not {'torch', 'megatron'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, {"model": {"num_layers": 4, "vision": {"patch_size": 16}},
                            "parallel": {"pp": 2}, "train": {"lr": "1e-3"}, "checkpoint": None})
    cfg = load_config(path, ["model.vision.image_size=224", "parallel.pipeline_layers=[1,3]", "train.lr=1e-4",
                             "train.iters=5", "parallel.sequence_parallel=true", "model.num_query_groups=8",
                             "model.num_query_groups=null", "train.run_dir=2024", "checkpoint.dir=/tmp/ck"])
    assert cfg.model.num_layers == 4 and cfg.model.vision.patch_size == 16 and cfg.model.vision.image_size == 224
    assert cfg.parallel.pp == 2 and cfg.parallel.pipeline_layers == [1, 3]
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # yaml 1.1 reads "1e-4" as a string
    assert cfg.train.iters == 5 and cfg.parallel.sequence_parallel is True
    assert cfg.model.num_query_groups is None  # later override wins; null -> None
    assert cfg.train.run_dir == "2024" and cfg.checkpoint.dir == "/tmp/ck"
    assert cfg.model.hidden_size == 4096  # untouched keys keep their defaults
    assert resolved_pipeline_layers(cfg) == [1, 3]


def test_int_accepted_for_float_and_even_pipeline_split():
    cfg = load_config(None, ["train.clip_grad=2", "parallel.pp=2", "parallel.vpp=2"])
    assert cfg.train.clip_grad == 2.0 and isinstance(cfg.train.clip_grad, float)
    assert resolved_pipeline_layers(cfg) == [8, 8, 8, 8]


def test_type_errors():
    msg = load_error(None, ["train.iters=abc", "train.lr=fast", "parallel.sequence_parallel=1",
                            "parallel.pipeline_layers=[1, x]", "model.vision=3", "train.iters=1.5"])
    assert "train.iters: expected int, got 'abc'" in msg
    assert "train.lr: expected float, got 'fast'" in msg
    assert "parallel.sequence_parallel: expected bool, got 1" in msg
    assert "parallel.pipeline_layers: expected list of int or null, got [1, 'x']" in msg
    assert "model.vision: expected a mapping" in msg
    assert "train.iters: expected int, got 1.5" in msg
    assert "invalid configuration (6 problems):" in msg


def test_unknown_key_in_yaml_suggests(tmp_path):
    path = write(tmp_path, {"parallel": {"tpp": 2}, "model": {"vision": {"img_size": 224}}, "trian": {}})
    msg = load_error(path)
    assert "unknown key 'parallel.tpp' (did you mean 'parallel.tp'?)" in msg
    assert "unknown key 'model.vision.img_size' (did you mean 'model.vision.image_size'?)" in msg
    assert "unknown key 'trian' (did you mean 'train'?)" in msg


def test_unknown_key_in_override_suggests():
    msg = load_error(None, ["train.itres=3", "model.visoin.image_size=224", "model.vision.image_size.x=1"])
    assert "unknown key 'train.itres' (did you mean 'train.iters'?)" in msg
    assert "unknown key 'model.visoin' (did you mean 'model.vision'?)" in msg
    assert "'model.vision.image_size' is a value, not a section" in msg


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert f"config file not found: {missing}" in load_error(missing)


def test_malformed_override_and_non_mapping_yaml(tmp_path):
    assert "override 'train.iters' is not of the form section.key=value" in load_error(None, ["train.iters"])
    assert "top level must be a mapping" in load_error(write(tmp_path, "- 1\n- 2\n"))
    assert "not valid YAML" in load_error(write(tmp_path, "train: [1,\n"))
    assert load_config(write(tmp_path, "")) == Config()  # empty file = defaults


def test_config_error_format_and_pickle():
    e = ConfigError(["a is bad", "b is bad"])
    assert str(e) == "invalid configuration (2 problems):\n  - a is bad\n  - b is bad"
    assert pickle.loads(pickle.dumps(e)).problems == e.problems


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.vision.image_size=224", "parallel.pipeline_layers=[10,22]", "parallel.pp=2",
                             "train.lr=1e-4", "checkpoint.dir=ck", "train.precision=bf16", "model.num_query_groups=8"])
    path = str(tmp_path / "sub" / "resolved.yaml")
    dump_yaml(cfg, path)
    assert load_config(path) == cfg
    assert to_dict(cfg)["model"]["vision"]["image_size"] == 224
    assert list(yaml.safe_load(open(path))) == ["model", "parallel", "train", "data", "checkpoint",
                                                  "kernels", "lora"]  # not sorted


# ------------------------------------------------------------------------------------------------- validation


INVALID = {
    "world_size": (["parallel.tp=2", "parallel.pp=2"], 6,
                   "world size 6 is not divisible by tp*pp=4: launch a multiple of 4 ranks or change "
                   "parallel.tp/parallel.pp"),
    "tp_heads": (["parallel.tp=3", "model.ffn_hidden_size=12288"], 3,
                 "parallel.tp=3 does not divide model.num_attention_heads=32: choose tp in [1, 2, 4, 8, 16, 32]"),
    "tp_query_groups": (["parallel.tp=4", "model.num_query_groups=2"], 4,
                        "parallel.tp=4 does not divide model.num_query_groups=2: choose tp in [1, 2]"),
    "tp_vision_ffn": (["parallel.tp=8", "model.vision.ffn_hidden_size=4100"], 8,
                      "parallel.tp=8 does not divide model.vision.ffn_hidden_size=4100"),
    "gqa": (["model.num_query_groups=5"], 1,
            "model.num_query_groups=5 does not divide model.num_attention_heads=32: choose num_query_groups in"),
    "hidden_heads": (["model.hidden_size=4100"], 1,
                     "model.hidden_size=4100 is not divisible by model.num_attention_heads=32"),
    "pp_too_big": (["model.num_layers=2", "parallel.pp=4"], 4, "parallel.pp=4 exceeds model.num_layers=2"),
    "vpp_without_pp": (["parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp > 1"),
    "vpp_zero": (["parallel.pp=2", "parallel.vpp=0"], 2, "parallel.vpp=0 must be >= 1"),
    "pl_len": (["parallel.pp=2", "parallel.vpp=2", "parallel.pipeline_layers=[16,16]"], 2,
               "parallel.pipeline_layers has 2 entries but parallel.pp*parallel.vpp=4"),
    "pl_sum": (["parallel.pp=2", "parallel.pipeline_layers=[10,20]"], 2,
               "parallel.pipeline_layers=[10, 20] sums to 30 but model.num_layers=32"),
    "pl_negative": (["parallel.pp=2", "parallel.pipeline_layers=[-1,33]"], 2, "has negative entries"),
    "pl_without_pp": (["parallel.pipeline_layers=[32]"], 1,
                      "parallel.pipeline_layers is set but parallel.pp=1"),
    "too_few_layers": (["parallel.pp=4", "model.num_layers=3"], 4,
                       "model.num_layers=3 is fewer than the parallel.pp=4 pipeline chunks"),
    "sequence_parallel": (["parallel.sequence_parallel=true"], 1,
                          "parallel.sequence_parallel=true needs parallel.tp > 1"),
    "global_batch": (["train.global_batch_size=10", "train.micro_batch_size=2"], 2,
                     "train.global_batch_size=10 is not divisible by micro_batch_size*dp = 4"),
    "interleaved_microbatches": (["parallel.pp=4", "parallel.vpp=2", "train.global_batch_size=6"], 4,
                                 "6 micro-batches per step"),
    "negative_lr": (["train.lr=-1e-4"], 1, "train.lr=-0.0001 must be > 0"),
    "min_lr": (["train.min_lr=1e-3"], 1, "train.min_lr=0.001 must be in [0, train.lr=2e-05]"),
    "warmup": (["train.lr_warmup_fraction=1.5"], 1, "train.lr_warmup_fraction=1.5 must be in [0, 1]"),
    "decay_style": (["train.lr_decay_style=cos"], 1,
                    "train.lr_decay_style='cos' is not supported: use one of cosine, linear, constant"),
    "precision": (["train.precision=fp16"], 1, "train.precision='fp16' is not supported"),
    "iters": (["train.iters=0"], 1, "train.iters=0 must be >= 1"),
    "image_size": (["model.vision.image_size=225"], 1,
                   "model.vision.image_size=225 is not divisible by patch_size=14: use 224 or 238"),
    "select_layer": (["model.vision.select_layer=0"], 1, "model.vision.select_layer=0 must be in [-24, -1]"),
    "projector": (["model.projector=qformer"], 1, "model.projector='qformer' is not supported"),
    "source": (["data.source=webdataset"], 1,
               "data.source='webdataset' is not supported: allowed values are 'synthetic'"),
    "seq_length": (["data.seq_length=512"], 1, "data.seq_length=512 is too short"),
    "seq_length_many_images": (["data.seq_length=1024", "data.max_images_per_sample=2"], 1,
                               "use seq_length >= 1168"),
    "text_only_fraction": (["data.text_only_fraction=-0.1"], 1, "data.text_only_fraction=-0.1 must be in [0, 1]"),
    "nothing_to_train": (["model.train_llm=false", "model.train_projector=false"], 1, "nothing to train"),
    "checkpoint_interval": (["checkpoint.interval=-5"], 1, "checkpoint.interval=-5 must be >= 0"),
    "num_layers": (["model.num_layers=0"], 1, "model.num_layers=0 must be >= 1"),
    "tp_zero": (["parallel.tp=0"], 1, "parallel.tp=0 must be >= 1"),
    "recompute": (["train.recompute=block"], 1, "train.recompute='block' is not supported: use one of none, "),
    "recompute_modules": (["train.recompute=selective", "train.recompute_modules=[core_attn, moe]"], 1,
                          "train.recompute_modules=['core_attn', 'moe'] must be a non-empty list of core_attn, "),
    "bf16_weights_distopt": (["train.master_weights=false", "train.precision=bf16"], 1,
                             "train.master_weights=false keeps no fp32 optimizer state to shard: set "
                             "parallel.use_distributed_optimizer=false"),
    "bf16_weights_fp32_grads": (["train.master_weights=false", "parallel.use_distributed_optimizer=false",
                                 "train.grad_reduce_in_fp32=true"], 1,
                                "train.grad_reduce_in_fp32=true needs fp32 master weights"),
    "bf16_weights_fp32": (["train.master_weights=false", "parallel.use_distributed_optimizer=false",
                           "train.precision=fp32"], 1, "train.precision=fp32 has no lower-precision copy"),
    "overlap_param_gather": (["parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=false"], 1,
                             "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true"),
    "ce_chunk": (["kernels.cross_entropy_chunk=0"], 1, "kernels.cross_entropy_chunk=0 must be >= 1"),
    "flex_recompute": (["kernels.flex_attention=true", "train.recompute=full"], 1,
                       "kernels.flex_attention=true cannot be combined with train.recompute='full'"),
}


@pytest.mark.parametrize("overrides, world_size, expected", list(INVALID.values()), ids=list(INVALID))
def test_invalid_config(overrides, world_size, expected):
    assert expected in problems(overrides, world_size)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, ["parallel.tp=3", "train.lr=-1", "model.vision.image_size=225",
                                    "data.source=webdataset", "parallel.vpp=2", "checkpoint.interval=-1"]), 3)
    msg = str(e.value)
    for expected in ("parallel.tp=3 does not divide model.num_attention_heads=32", "train.lr=-1.0 must be > 0",
                     "model.vision.image_size=225 is not divisible", "data.source='webdataset'",
                     "parallel.vpp=2 needs parallel.pp > 1", "checkpoint.interval=-1 must be >= 0"):
        assert expected in msg
    assert len(e.value.problems) >= 6
    assert msg.startswith(f"invalid configuration ({len(e.value.problems)} problems):\n  - ")


def test_valid_parallel_layouts():
    validate(load_config(None, ["parallel.tp=2", "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=8"]), 8)
    cfg = load_config(None, ["parallel.pp=2", "parallel.pipeline_layers=[0,32]", "model.num_query_groups=8",
                             "parallel.tp=8", "parallel.sequence_parallel=true"])
    validate(cfg, 32)
    assert data_parallel_size(cfg, 32) == 2 and num_microbatches(cfg, 32) == 4
    assert resolved_pipeline_layers(cfg) == [0, 32]


def test_balanced_split_when_pp_does_not_divide_the_layers():
    from megallava.config import balanced_split, resolved_pipeline_layers

    assert balanced_split(5, 2) == [2, 3] and balanced_split(32, 3) == [10, 11, 11] and balanced_split(8, 4) == [2] * 4
    cfg = load_config(None, ["parallel.pp=3"])
    validate(cfg, 3)
    assert resolved_pipeline_layers(cfg) == [10, 11, 11]  # stage 0 (with the ViT) carries the fewest


# ------------------------------------------------------------------------------------------ ${VAR} path templates

def test_paths_expand_environment_variables(tmp_path, monkeypatch):
    """train.run_dir and the checkpoint paths are filled from the environment (SLURM's job id and name), from the
    YAML and from overrides; other keys and checkpoint.load=auto are left alone."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "llava-7b")
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    path = write(tmp_path, {"train": {"run_dir": "runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"},
                            "checkpoint": {"dir": "$SCRATCH/ckpt/${SLURM_JOB_ID}"}})
    cfg = load_config(path, ["checkpoint.load=auto", "checkpoint.load_projector=${SCRATCH}/s1/iter_0000001"])
    assert cfg.train.run_dir == "runs/llava-7b-4242"
    assert cfg.checkpoint.dir == f"{tmp_path}/ckpt/4242"
    assert cfg.checkpoint.load == "auto"
    assert cfg.checkpoint.load_projector == f"{tmp_path}/s1/iter_0000001"
    cfg = load_config(None, ["train.run_dir=/r/$SLURM_JOB_NAME/${SLURM_JOB_ID}", "checkpoint.load=${SCRATCH}"])
    assert cfg.train.run_dir == "/r/llava-7b/4242" and cfg.checkpoint.load == str(tmp_path)
    validate(cfg, world_size=1)


def test_unset_variable_in_a_path_is_named(monkeypatch):
    """Outside SLURM the job id is not set: the path keeps the template and validation names the key."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("MEGALLAVA_UNSET_VAR", raising=False)
    msg = problems(["train.run_dir=runs/job-${SLURM_JOB_ID}", "checkpoint.dir=$MEGALLAVA_UNSET_VAR/ck"])
    assert ("train.run_dir=runs/job-${SLURM_JOB_ID}: the environment variable in it is not set (templates such as "
            "runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID} are filled from the environment)") in msg
    assert "checkpoint.dir=$MEGALLAVA_UNSET_VAR/ck: the environment variable in it is not set" in msg
    assert "invalid configuration (2 problems)" in msg


def test_pretrained_is_for_auto_resume_only(tmp_path, monkeypatch):
    """checkpoint.pretrained starts a run whose checkpoint.load=auto finds nothing: with a fixed checkpoint.load it
    would never be used (refused, naming both keys); a missing path is named; ${VAR} is filled like the others."""
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    (tmp_path / "s1").mkdir()
    cfg = load_config(None, ["checkpoint.dir=ck", "checkpoint.load=auto", "checkpoint.pretrained=${SCRATCH}/s1"])
    assert cfg.checkpoint.pretrained == f"{tmp_path}/s1"
    validate(cfg, world_size=1)
    validate(load_config(None, [f"checkpoint.pretrained={tmp_path}/s1"]), world_size=1)  # a plain new run
    msg = problems([f"checkpoint.load={tmp_path}/s1", f"checkpoint.pretrained={tmp_path}/s1"])
    assert (f"checkpoint.pretrained={tmp_path}/s1 is used only when checkpoint.load finds nothing, and "
            f"checkpoint.load={tmp_path}/s1 always finds a checkpoint: set checkpoint.load=auto") in msg
    gone = f"checkpoint.pretrained={tmp_path}/gone"
    assert f"{gone} does not exist" in problems([gone])

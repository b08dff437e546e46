"""Validation loss (data.valid_sources, train.eval_interval): the same held-out global batches every time, so the
value is a function of the weights alone; equal at TP1xPP1, TP2xPP2 and DP2; it does not change training."""
import os

import pytest
import torch

from megallava import config as C
from tests.multirank import run_ranks

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")


def _train(world, overrides, demo_data, run_dir):
    base = ["parallel.tp=1", "parallel.pp=1", "train.iters=4", "train.global_batch_size=8", "train.micro_batch_size=2",
            f"train.run_dir={run_dir}", f"data.tokenizer={demo_data}/tokenizer.model", "data.num_workers=0",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]"]
    valid = [f"data.valid_sources=[{{path: {demo_data}/shards/instruct}}, {{path: {demo_data}/shards/sharegpt}}]",
             "train.eval_interval=2", "train.eval_iters=2"]

    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(DEMO, base + valid + overrides)
        C.validate(cfg, env.world_size)
        return run(cfg, env)

    return run_ranks(world, fn)[0]


def test_validation_loss_across_layouts(demo_data, tmp_path):
    ref = _train(1, [], demo_data, tmp_path / "ref")
    evals = [r for r in ref if "valid/loss" in r]
    assert [r["iteration"] for r in evals] == [2, 4]
    assert evals[0]["valid/loss"] != evals[1]["valid/loss"]  # the weights moved; the batches did not
    assert evals[0]["valid/trained_tokens"] == evals[1]["valid/trained_tokens"] > 0
    assert evals[0]["valid/loss/instruct"] > 0 and evals[0]["valid/loss/sharegpt"] > 0
    for world, layout in ((4, ["parallel.tp=2", "parallel.pp=2"]), (2, [])):
        got = _train(world, layout, demo_data, tmp_path / f"w{world}")
        for a, b in zip(got, ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            if "valid/loss" in b:
                for key in ("valid/loss", "valid/loss/instruct", "valid/loss/sharegpt"):
                    assert a[key] == pytest.approx(b[key], rel=1e-5), key
    plain = _train(1, ["train.eval_interval=0", "data.valid_sources=[]"], demo_data, tmp_path / "plain")
    assert [r["loss"] for r in plain] == [r["loss"] for r in ref]  # evaluating does not touch training
    lines = open(tmp_path / "ref" / "metrics.jsonl").read()
    assert '"valid/loss"' in lines

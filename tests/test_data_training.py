"""The trainer on real webdataset shards (the embedded demo data): losses, per-source losses and trained-token
counts are the same at TP1xPP1, TP2xPP2 and DP2, and resuming mid-run continues the same sample sequence."""
import os

import pytest
import torch

from megallava import config as C
from tests.multirank import run_ranks

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "demo.yaml")

def train(world, overrides, demo_data, run_dir):
    base = [f"data.tokenizer={demo_data}/tokenizer.model",
            f"data.sources=[{{path: {demo_data}/shards/instruct, weight: 0.75}}, "
            f"{{path: {demo_data}/shards/sharegpt, weight: 0.25}}]",
            "train.iters=3", f"train.run_dir={run_dir}", "data.num_workers=1"]

    def fn(rank, env):
        from megallava.training.train import run

        cfg = C.load_config(DEMO, base + overrides)
        C.validate(cfg, env.world_size)
        return run(cfg, env)

    return run_ranks(world, fn)[0]


def test_demo_shards_losses_match_across_layouts(demo_data, tmp_path):
    ref = train(1, ["parallel.tp=1", "parallel.pp=1"], demo_data, tmp_path / "ref")
    assert ref[0]["images"] > 0 and ref[0]["trained_tokens/sharegpt"] > 0 and ref[0]["trained_tokens/instruct"] > 0
    for world, layout in ((4, ["parallel.tp=2", "parallel.pp=2"]), (2, ["parallel.tp=1", "parallel.pp=1"])):
        got = train(world, layout, demo_data, tmp_path / f"w{world}")
        for r, g in zip(ref, got):
            for key in ("loss", "loss/instruct", "loss/sharegpt"):
                assert g[key] == pytest.approx(r[key], rel=1e-5), (world, layout, key)
            for key in ("trained_tokens", "trained_tokens/instruct", "trained_tokens/sharegpt", "tokens", "images"):
                assert g[key] == r[key], (world, layout, key)
